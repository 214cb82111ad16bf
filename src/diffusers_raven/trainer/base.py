"""What every diffusers-raven trainer shares, in the shape of TRL's GRPO trainer.

- **Data**: a `datasets.Dataset` of prompts. The train dataloader yields *generation batches*
  (``per_device_train_batch_size × steps_per_generation`` rows per process, each prompt repeated
  ``num_generations`` times, TRL's ``RepeatSampler``).
- **Rollouts** in ``_prepare_inputs``: once per generation batch the trainer calls :meth:`_generate` (no-grad
  rollouts, rewards, critic updates: whatever the method prepares), splits the result into ``steps_per_generation``
  micro-batches and serves one per call. The loss of a micro-batch is :meth:`compute_loss`; ``transformers.Trainer``
  does the backward pass, gradient accumulation, clipping and the optimizer step.
- **Chunk sampler**: rollouts run through :class:`~diffusers_raven.pipelines.ChunkSampler`, the routine the
  pipeline streams with, so training sees the history inference makes (context noise included).
- **Randomness**: every draw comes from generators seeded by ``(seed, generation batch, sample, purpose)``, so a
  sample draws the same numbers whatever the micro-batching or process count, and a resumed run draws exactly what
  the uninterrupted run drew.
- **Metrics** with TRL's naming: ``log_metric`` collects per-step values, averaged over the logging interval and
  over processes; evaluation (:meth:`evaluate`) generates the model's own videos for the eval prompts and reports
  ``eval_reward``, ``eval_rewards/<name>/mean`` and ``/std``.
- **EMA** through ``diffusers.training_utils.EMAModel``; checkpoints hold the student as a diffusers folder (or a
  LoRA adapter), the EMA and each trainer's extra modules; ``save_model`` writes a loadable pipeline folder and a
  model card built with ``huggingface_hub.ModelCard``.
- **DDP and FSDP2** come from accelerate through the Trainer. Under FSDP the student (and any other module the trainer
  prepares, e.g. RAVEN's critic) is sharded per block; the EMA shadows are sharded like the weights; checkpoints,
  ``save_pipeline`` and ``export_transformer`` gather full weights (collectives: every process calls them). On CPU
  the FSDP plugin is engaged by :func:`~diffusers_raven.trainer.fsdp.engage_fsdp`; a run that asks for FSDP and
  does not get it fails.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback
from transformers.trainer import SCHEDULER_NAME

from ..models import CausalWanTransformer3DModel, KVCache
from ..models.kv_cache import check_window
from ..pipelines import CausalVideoPipeline
from ..pipelines.chunk_sampler import CacheDenoiser, ChunkSampler, ChunkTrajectory
from ..pipelines.vae_streaming import denormalize_latents
from ..schedulers import ConsistencyFlowMatchScheduler
from ..training import RolloutRecord
from . import fsdp
from .config import VideoTrainerConfig
from .prompt_cache import PromptEmbeddingCache, RepeatedPromptStream

EXTRA_STATE_DIR = "raven_state"
BUFFER_FILE = "generation_buffer.pt"
RewardFunc = Callable[..., Sequence[float | None]]


class _PromptCollator:
    """Batches of ``{"prompt": [str], <other columns>: list or stacked tensor}``."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for key in features[0]:
            values = [f[key] for f in features]
            if key == "latents":
                values = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in values])
            batch[key] = values
        return batch


class _TrainerHooks(TrainerCallback):
    """Connects the trainer's own bookkeeping to ``transformers.Trainer``'s events."""

    def __init__(self, trainer: CausalVideoTrainerBase) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # The model is prepared (sharded under FSDP) by now: the EMA follows its layout.
        self.trainer._shard_ema()
        # A resumed run continues the micro-step count (it seeds the draws) and the generation batch it was in.
        self.trainer._step = state.global_step * args.gradient_accumulation_steps
        self.trainer._buffered_inputs = self.trainer._resumed_buffer
        self.trainer._resumed_buffer = None

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._on_step_end()


def _adapt_tensorboard(trainer: Trainer) -> None:
    """``report_to="tensorboard"``: transformers' callback writes the model config with ``to_json_string()``, which
    a diffusers config (a dict) lacks; swap in a subclass that writes it as JSON."""
    try:
        from transformers.integrations import TensorBoardCallback
    except ImportError:  # pragma: no cover
        return

    class DiffusersTensorBoardCallback(TensorBoardCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            model = kwargs.pop("model", None)
            super().on_train_begin(args, state, control, **kwargs)
            if self.tb_writer is not None and model is not None and isinstance(getattr(model, "config", None), dict):
                self.tb_writer.add_text("model_config", json.dumps(dict(model.config), default=str, indent=2))

    for callback in list(trainer.callback_handler.callbacks):
        if type(callback) is TensorBoardCallback:
            trainer.callback_handler.remove_callback(callback)
            trainer.callback_handler.add_callback(DiffusersTensorBoardCallback(tb_writer=callback.tb_writer))


def _epoch_repeat_sampler(dataset, mini_repeat_count: int, batch_size: int, repeat_count: int, shuffle: bool,
                          seed: int):
    """TRL's ``RepeatSampler`` reseeded per epoch (``set_epoch``), so a run resumed in a later epoch draws the same
    prompt order as the uninterrupted run."""
    from trl.trainer.utils import RepeatSampler

    class EpochRepeatSampler(RepeatSampler):
        def set_epoch(self, epoch: int) -> None:
            if self.shuffle:
                self.generator.manual_seed(seed + epoch)

    return EpochRepeatSampler(dataset, mini_repeat_count=mini_repeat_count, batch_size=batch_size,
                              repeat_count=repeat_count, shuffle=shuffle, seed=seed)


def _column_names(dataset) -> list[str]:
    """A dataset's columns; a streaming dataset of unknown features shows those of its first row."""
    names = getattr(dataset, "column_names", None)
    if names is None and isinstance(dataset, torch.utils.data.IterableDataset):
        names = list(next(iter(dataset), {}))
    return list(names or [])


def _batched(value: Any) -> bool:
    return isinstance(value, (list, RolloutRecord)) or (isinstance(value, torch.Tensor) and value.ndim > 0)


def split_batch(batch: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """Split a generation batch into ``parts`` micro-batches along the batch dimension (lists, tensors and
    :class:`~diffusers_raven.training.RolloutRecord`); scalars are shared."""
    sizes = {v.batch_size if isinstance(v, RolloutRecord) else len(v) for v in batch.values() if _batched(v)}
    if len(sizes) != 1:
        raise ValueError(f"The generation batch's entries disagree on the batch size: {sorted(sizes)}.")
    size = sizes.pop()
    if size % parts:
        raise ValueError(f"A generation batch of {size} rows does not split into {parts} micro-batches.")
    step = size // parts
    return [
        {k: v[i * step : (i + 1) * step] if _batched(v) else v for k, v in batch.items()} for i in range(parts)
    ]


def resolve_pipeline(model, pipeline: CausalVideoPipeline | None) -> tuple[CausalWanTransformer3DModel, CausalVideoPipeline]:
    """The student transformer and the pipeline whose other components (text encoder, VAE, scheduler) it uses."""
    if isinstance(model, (str, os.PathLike)):
        model = CausalVideoPipeline.from_pretrained(model)
    if isinstance(model, CausalVideoPipeline):
        return model.transformer, model
    if isinstance(model, CausalWanTransformer3DModel):
        if pipeline is None:
            raise ValueError(
                "`model` is a bare transformer: pass `pipeline=` (a CausalVideoPipeline whose text encoder, VAE and "
                "scheduler to use), or pass the pipeline itself as `model`."
            )
        pipeline.transformer = model
        return model, pipeline
    raise TypeError(
        f"`model` must be a CausalVideoPipeline, a path to one, or a CausalWanTransformer3DModel; got {type(model)}."
    )


def reward_name(fn: RewardFunc) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def score_videos(reward_funcs: Sequence[RewardFunc], prompts: list[str], videos: torch.Tensor,
                 columns: dict[str, list] | None = None) -> torch.Tensor:
    """``[B, n_funcs]`` float64 scores of every reward function (NaN where a function returned ``None``).

    A function that returns the wrong number of scores, a non-number or NaN raises a ``ValueError`` naming it."""
    columns = columns or {}
    scores = torch.full((len(prompts), len(reward_funcs)), float("nan"), dtype=torch.float64)
    for j, fn in enumerate(reward_funcs):
        values = list(fn(prompts=prompts, videos=videos, **columns))
        if len(values) != len(prompts):
            raise ValueError(
                f"The reward function `{reward_name(fn)}` returned {len(values)} scores for {len(prompts)} videos."
            )
        for i, value in enumerate(values):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
                torch.is_tensor(value) and value.numel() == 1
            ):
                raise ValueError(f"The reward function `{reward_name(fn)}` returned {value!r}: scores are numbers.")
            value = float(value)
            if math.isnan(value):
                raise ValueError(f"The reward function `{reward_name(fn)}` returned NaN (use None for no score).")
            scores[i, j] = value
    return scores


class CausalVideoTrainerBase(Trainer):
    """Shared machinery of the diffusers-raven trainers (see the module docstring).

    Subclasses implement :meth:`_generate` (optional: the no-grad part of a step, once per generation batch) and
    :meth:`compute_loss` (the loss of one micro-batch, with gradients).
    """

    _tag_names: list[str] = ["diffusers-raven", "video-generation", "autoregressive"]
    _method_name = "diffusers-raven"
    _citation = ""
    config_class: type[VideoTrainerConfig] = VideoTrainerConfig
    #: Rollouts per prompt (TRL's ``num_generations``); RL trainers set it from their config.
    num_generations: int = 1
    #: Optimisation passes per generation batch (TRL's ``num_iterations``).
    num_iterations: int = 1

    def __init__(self, model, args, train_dataset=None, eval_dataset=None, reward_funcs=None, pipeline=None,
                 peft_config=None, callbacks=None, optimizers=(None, None)):
        if not isinstance(args, self.config_class):
            raise TypeError(f"`args` must be a {self.config_class.__name__}, got {type(args).__name__}.")
        student, pipe = resolve_pipeline(model, pipeline)
        if train_dataset is None:
            raise ValueError(
                "`train_dataset` is required: a `datasets.Dataset` (or a streaming `datasets.IterableDataset`) with a "
                "`prompt` column."
            )
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if dataset is not None and "prompt" not in _column_names(dataset):
                raise ValueError(f"`{name}` must have a `prompt` column; it has {_column_names(dataset)}.")
        if isinstance(eval_dataset, torch.utils.data.IterableDataset):
            raise TypeError("`eval_dataset` must be a `datasets.Dataset` (evaluation splits the prompts by index).")
        self.reward_funcs = self._check_rewards(reward_funcs, args)
        if eval_dataset is not None and not self.reward_funcs:
            raise ValueError(
                "`eval_dataset` is scored with reward functions on the model's own videos: pass `reward_funcs` "
                "(e.g. `diffusers_raven.rewards.semantic_reward` for ShapesWorld captions)."
            )
        self.peft_config = peft_config
        if peft_config is not None:
            student.requires_grad_(False)
            student.add_adapter(peft_config)
        pipe.set_progress_bar_config(disable=True)
        for frozen in (pipe.text_encoder, pipe.vae):
            frozen.requires_grad_(False).eval()
        self.pipeline = pipe
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._buffered_inputs: list[dict[str, Any]] | None = None
        self._resumed_buffer: list[dict[str, Any]] | None = None
        self._step = 0
        self._generation = 0
        self._generation_seconds = 0.0
        self._setup_video(pipe, args)
        global_batch = args.per_device_train_batch_size * args.world_size * args.steps_per_generation
        if global_batch % self.num_generations:
            raise ValueError(
                f"The global generation batch ({global_batch} = per_device_train_batch_size × processes × "
                f"steps_per_generation) must be a multiple of `num_generations` ({self.num_generations}), so that "
                "every prompt's rollouts are in one generation batch."
            )
        super().__init__(
            model=student,
            args=args,
            data_collator=_PromptCollator(),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.add_callback(_TrainerHooks(self))
        _adapt_tensorboard(self)
        device = self.accelerator.device
        pipe.text_encoder.to(device)
        pipe.vae.to(device)
        self.prompt_cache = PromptEmbeddingCache(args.prompt_cache_size,
                                                 device if args.prompt_cache_device == "device" else "cpu")
        self.ema: EMAModel | None = None
        if args.ema_decay is not None:
            # A fixed decay (min_decay = decay); update_after_step = start − 1 copies the weights through step `start`.
            self.ema = EMAModel(self._ema_parameters(student), decay=args.ema_decay, min_decay=args.ema_decay,
                                update_after_step=args.ema_start_step - 1)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _check_rewards(reward_funcs, args) -> list[RewardFunc]:
        if reward_funcs is None:
            funcs = []
        elif callable(reward_funcs):
            funcs = [reward_funcs]
        else:
            funcs = list(reward_funcs)
        for fn in funcs:
            if not callable(fn):
                raise TypeError(f"`reward_funcs` must be callables `fn(prompts, videos, **columns)`, got {fn!r}.")
        if args.reward_weights is not None and len(args.reward_weights) != len(funcs):
            raise ValueError(
                f"`reward_weights` has {len(args.reward_weights)} entries for {len(funcs)} reward functions."
            )
        return funcs

    def _setup_video(self, pipe: CausalVideoPipeline, args: VideoTrainerConfig) -> None:
        """Geometry of the training videos and the chunk sampler of the rollouts."""
        latent_frames = pipe.latent_frames_for(args.num_frames)
        chunk = pipe.chunk_frames
        if latent_frames % chunk:
            raise ValueError(
                f"`num_frames`={args.num_frames} gives {latent_frames} latent frames, not a whole number of "
                f"{chunk}-frame chunks; use num_frames = 1 + {pipe.vae_scale_factor_temporal}·({chunk}·n − 1)."
            )
        check_window(args.window_frames, args.sink_frames, chunk)
        self.chunk_sizes = [chunk] * (latent_frames // chunk)
        self.height = args.height or pipe.default_height
        self.width = args.width or pipe.default_width
        factor = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
        if self.height % factor or self.width % factor:
            raise ValueError(f"`height` and `width` must be multiples of {factor}, got {self.height}×{self.width}.")
        factor = pipe.vae_scale_factor_spatial
        self.latent_shape = (pipe.transformer.config.in_channels, latent_frames, self.height // factor,
                             self.width // factor)
        scheduler = self._rollout_scheduler(pipe, args)
        scheduler.set_timesteps(sigmas=args.denoising_sigmas)
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.sampler = ChunkSampler(scheduler, args.context_noise)
        self.sigmas = torch.tensor(self.sampler.sigmas, dtype=torch.float32)

    def _rollout_scheduler(self, pipe: CausalVideoPipeline, args: VideoTrainerConfig):
        """The scheduler of training rollouts: the consistency sampler on the pipeline's schedule config."""
        return ConsistencyFlowMatchScheduler.from_config(pipe.scheduler.config)

    @staticmethod
    def _ema_parameters(student) -> list[torch.nn.Parameter]:
        return [p for p in student.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ distribution (DDP / FSDP2)
    def create_accelerator_and_postprocess(self) -> None:
        """transformers' accelerator, then the FSDP check of :func:`~diffusers_raven.trainer.fsdp.engage_fsdp`: a run
        that asks for FSDP runs FSDP (on CPU too) or fails; it never falls back to DDP silently."""
        super().create_accelerator_and_postprocess()
        if fsdp.engage_fsdp(self.accelerator, self.args):
            self.is_fsdp_enabled = True

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if self.is_fsdp_enabled:  # the blocks must write into the model's own attention context (see the function)
            fsdp.keep_block_inputs(self.student)
        return model, train_dataloader

    def clip_gradients(self, module: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Clip ``module``'s gradients to a total norm of ``max_norm`` (sharded or not); returns the norm before."""
        if self.is_fsdp_enabled:
            return fsdp.clip_grad_norm(module.parameters(), max_norm)
        return self.accelerator.clip_grad_norm_(module.parameters(), max_norm)

    def _clip_grad_norm(self, model):
        if self.is_fsdp_enabled:  # accelerate's lookup of the owning model fails with two prepared models
            return fsdp.clip_grad_norm(model.parameters(), self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and self.is_fsdp_enabled:
            grad_norm = fsdp.clip_grad_norm(model.parameters(), float("inf"))
        return super()._get_grad_norm(model, grad_norm)

    def _shard_ema(self) -> None:
        """Under FSDP, lay the EMA shadows out as the student's parameters (each process keeps its shard and updates
        it locally); a no-op when they already match or without EMA."""
        if self.ema is None or not self.is_fsdp_enabled:
            return
        params = self._ema_parameters(self.student)
        self.ema.shadow_params = [fsdp.shard_like(s, p) for s, p in zip(self.ema.shadow_params, params)]

    def _ema_full_shadows(self) -> list[torch.Tensor]:
        """The EMA weights as full tensors (gathered under FSDP: every process calls it)."""
        return [fsdp.full_tensor(s) for s in self.ema.shadow_params]

    def _standalone_student(self) -> CausalWanTransformer3DModel:
        """A plain (unsharded, unwrapped) copy of the student with its current weights, LoRA adapter unfused.

        Under FSDP the weights are gathered (every process calls it) into a model built on the meta device, so the
        copy costs one set of full weights in host memory."""
        if not self.is_fsdp_enabled:
            return copy.deepcopy(self.student)
        return self._student_from_state(fsdp.gather_state_dict(self.student))

    def _student_from_state(self, state: dict[str, torch.Tensor]) -> CausalWanTransformer3DModel:
        """A plain student holding the full ``state`` (built on the meta device, then assigned ``state``; the buffers
        outside the state dict are copied from the live student)."""
        from torch.distributed.fsdp import FSDPModule

        student = self.student
        cls = next(c for c in type(student).__mro__ if not issubclass(c, FSDPModule))
        with torch.device("meta"):
            model = cls.from_config(student.config)
            if self.peft_config is not None:
                model.add_adapter(self.peft_config)
        live = {fsdp.clean_name(n): p for n, p in student.named_parameters()}
        for name, param in model.named_parameters():
            param.requires_grad_(live[name].requires_grad)
        model.load_state_dict(state, strict=True, assign=True)
        buffers = {fsdp.clean_name(n): b for n, b in student.named_buffers()}
        for name, buffer in list(model.named_buffers()):
            if buffer.is_meta:  # non-persistent buffers (e.g. the RoPE tables) are not in the state dict
                owner, _, leaf = name.rpartition(".")
                model.get_submodule(owner)._buffers[leaf] = buffers[name].detach().to("cpu", copy=True)
        return model

    # ------------------------------------------------------------------ helpers
    @property
    def student(self) -> CausalWanTransformer3DModel:
        return self.accelerator.unwrap_model(self.model)

    def _seeded(self, key: str) -> torch.Generator:
        digest = hashlib.sha256(f"{self.args.seed}/{key}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))

    def sample_generators(self, purpose: str, sample_index: torch.Tensor) -> list[torch.Generator]:
        """One generator per sample, seeded by (seed, generation batch, sample, purpose): a sample draws the same
        numbers whatever the batch size, the micro-batching or the process it is on, and a resumed run draws what the
        uninterrupted run drew. ``sample_index`` is the batch's ``sample_index`` column."""
        return [self._seeded(f"{self._generation}/{int(i)}/{purpose}") for i in sample_index]

    def shared_generator(self, purpose: str) -> torch.Generator:
        """A generator seeded by (seed, generation batch, purpose), the same for every sample and process (e.g. Self
        Forcing's exit step)."""
        return self._seeded(f"{self._generation}/shared/{purpose}")

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Frozen text-encoder states of ``prompts`` on the training device, through the bounded prompt cache
        (:class:`~diffusers_raven.trainer.prompt_cache.PromptEmbeddingCache`: ``prompt_cache_size`` prompts, least
        recently used out, on ``prompt_cache_device``)."""
        states = {p: self.prompt_cache.get(p) for p in dict.fromkeys(prompts)}
        missing = [p for p, s in states.items() if s is None]
        if missing:
            embeds = self.pipeline.encode_prompt(
                missing, max_sequence_length=self.args.max_sequence_length, device=self.accelerator.device,
                dtype=self.student.dtype,
            )[0]
            for prompt, embed in zip(missing, embeds):
                states[prompt] = embed
                self.prompt_cache.put(prompt, embed)
        device = self.accelerator.device
        return torch.stack([states[p].to(device) for p in prompts])

    def new_kv_cache(self, batch_size: int, pool_frames: int | None = None) -> KVCache:
        """A fresh KV cache for the student with the training window and sinks (``pool_frames``: older frames kept
        beyond the window, for KVPO routing)."""
        return KVCache.for_model(self.student, batch_size, window_frames=self.args.window_frames,
                                 sink_frames=self.args.sink_frames, pool_frames=pool_frames)

    def rollout_chunks(
        self,
        prompt_embeds: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        model: torch.nn.Module | None = None,
        kv_cache: KVCache | None = None,
        **sample_kwargs,
    ) -> Iterator[ChunkTrajectory]:
        """:meth:`rollout` as an iterator: each chunk is yielded once its context is in the cache, so the caller may
        act on ``kv_cache`` (snapshot, restore, route) between two chunks. ``kv_cache`` defaults to a fresh cache."""
        batch = prompt_embeds.shape[0]
        channels, frames, h, w = self.latent_shape
        cache = kv_cache if kv_cache is not None else self.new_kv_cache(batch)
        denoiser = CacheDenoiser(model if model is not None else self.student, cache, prompt_embeds)
        return self.sampler.chunks(denoiser, (batch, channels, h, w), self.pipeline.chunk_frames, frames,
                                   generator=generator, device=prompt_embeds.device, dtype=self.student.dtype,
                                   **sample_kwargs)

    def rollout(
        self,
        prompt_embeds: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        model: torch.nn.Module | None = None,
        **sample_kwargs,
    ) -> list[ChunkTrajectory]:
        """The student's chunk-by-chunk sample of a training video through a fresh KV cache: the pipeline's chunk
        sampler with the training window, sinks and context noise. ``model`` (default: the student) may be the
        distributed wrapper for a pass with gradients; ``sample_kwargs`` go to :meth:`ChunkSampler.chunks`
        (``latents``, ``history``, ``start_step``, ``exit_step``, ``grad``, ``record``, ``first_frame``)."""
        return list(self.rollout_chunks(prompt_embeds, generator, model, **sample_kwargs))

    # ------------------------------------------------------------------ RL pieces shared by the reward trainers
    def _init_reference(self, ref_model, needed: bool) -> None:
        """The reference policy of a KL term: ``None`` under LoRA (the adapter-disabled model, see
        :meth:`reference_model`) or when not ``needed``; else ``ref_model`` or a frozen copy of the starting student."""
        self.ref_model = None
        if needed and self.peft_config is None:
            reference = ref_model if ref_model is not None else copy.deepcopy(self.student)
            self.ref_model = reference.to(self.accelerator.device).requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference_model(self):
        """The reference policy for the duration of a ``with`` block: the frozen copy, or (LoRA) the trained model with
        its adapter disabled (enabled again on exit)."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        self.student.disable_adapters()
        try:
            yield self.model
        finally:
            self.student.enable_adapters()

    def log_reward_metrics(self, scores: torch.Tensor, weights: torch.Tensor, groups: torch.Tensor) -> None:
        """TRL's reward metrics of ``scores`` ``[N, n_funcs]`` (NaN = no score) in prompt groups ``groups`` ``[N]``:
        ``reward`` is the mean of the weighted sum of the raw scores (``Σ_f w_f r_f``, None skipped), so that it reads
        on the rewards' own scale; ``reward_std`` is the mean over prompt groups of that sum's (biased) std within the
        group; ``rewards/<name>/mean`` and ``/std`` per function."""
        from ..training.grpo import aggregate_rewards, group_advantages

        raw = aggregate_rewards(scores, weights, groups, "sum_then_normalize")
        scored = ~torch.isnan(raw)
        self.log_metric("reward", raw[scored].mean())
        _, raw_stats = group_advantages(torch.where(scored, raw, torch.nan), groups, "none")
        self.log_metric("reward_std", raw_stats["group_std"].mean())
        for j, fn in enumerate(self.reward_funcs):
            column = scores[:, j][~torch.isnan(scores[:, j])]
            if len(column):
                self.log_metric(f"rewards/{reward_name(fn)}/mean", column.mean())
                self.log_metric(f"rewards/{reward_name(fn)}/std", column.std(unbiased=False))

    def log_metric(self, name: str, value: float | torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][name].append(float(value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the step metrics, averaged over the logging interval and over every process (as TRL does)."""
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        names = sorted(metrics)
        if names:
            local = torch.tensor([sum(metrics[n]) / len(metrics[n]) for n in names], device=self.accelerator.device)
            averaged = self.accelerator.gather(local[None]).mean(dim=0)
            prefix = "" if mode == "train" else "eval_"
            logs = {**logs, **{prefix + n: float(v) for n, v in zip(names, averaged)}}
        metrics.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ data and steps
    def get_train_dataloader(self):
        """Generation batches: ``per_device_train_batch_size × steps_per_generation`` rows per process. A streaming
        dataset is read through :class:`~diffusers_raven.trainer.prompt_cache.RepeatedPromptStream` (the sampler's
        order), every process keeping its slice of each global batch (accelerate's ``IterableDatasetShard``)."""
        if isinstance(self.train_dataset, torch.utils.data.IterableDataset):
            return self._get_stream_dataloader()
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_stream_dataloader(self):
        from accelerate.data_loader import prepare_data_loader
        from torch.utils.data import DataLoader

        args = self.args
        global_batch = args.per_device_train_batch_size * args.world_size * args.steps_per_generation
        stream = RepeatedPromptStream(self.train_dataset, global_batch // self.num_generations, self.num_generations,
                                      self.num_iterations * args.steps_per_generation)
        loader = DataLoader(stream, batch_size=self._train_batch_size * args.steps_per_generation,
                            collate_fn=self.data_collator, num_workers=args.dataloader_num_workers)
        # Every process reads the stream and keeps its slice (no dispatching: the batches hold strings).
        return prepare_data_loader(loader, self.accelerator.device, num_processes=args.world_size,
                                   process_index=args.process_index, put_on_device=False, dispatch_batches=False)

    def _first_prompt(self) -> str:
        if isinstance(self.train_dataset, torch.utils.data.IterableDataset):
            return next(iter(self.train_dataset))["prompt"]
        return self.train_dataset[0]["prompt"]

    def _get_train_sampler(self, dataset=None):
        """Each prompt ``num_generations`` times in one global generation batch, the batch repeated for its
        ``steps_per_generation × num_iterations`` micro-steps (TRL's ``RepeatSampler``)."""
        dataset = self.train_dataset if dataset is None else dataset
        global_batch = self.args.per_device_train_batch_size * self.args.world_size * self.args.steps_per_generation
        return _epoch_repeat_sampler(dataset, self.num_generations, global_batch // self.num_generations,
                                     self.num_iterations * self.args.steps_per_generation, shuffle=True,
                                     seed=self.args.seed)

    def _prepare_inputs(self, generation_batch: dict[str, Any]) -> dict[str, Any]:
        """Make a generation batch's rollouts once (:meth:`_generate`), then serve its micro-batches in turn.

        Rows get a ``sample_index`` (their position in the global generation batch) that seeds their draws."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        self._generation = self._step // generate_every
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            rows = len(generation_batch["prompt"])
            index = torch.arange(rows) + self.args.process_index * rows
            generation_batch = {**generation_batch, "sample_index": index}
            start = time.perf_counter()
            self._buffered_inputs = split_batch(self._generate(generation_batch), self.args.steps_per_generation)
            self._generation_seconds = time.perf_counter() - start
            self.log_metric("timing/generation", self._generation_seconds)
            self.log_metric("prompt_cache/prompts", len(self.prompt_cache))
            self.log_metric("prompt_cache/megabytes", self.prompt_cache.nbytes / 2**20)
        inputs = self._buffered_inputs[self._step % self.args.steps_per_generation]
        self._step += 1
        return inputs

    def training_step(self, model, inputs, num_items_in_batch=None):
        """``Trainer``'s step (rollouts when a generation batch starts, then the loss, backward and accumulation),
        timed: ``timing/policy`` is the step without the generation."""
        start = time.perf_counter()
        self._generation_seconds = 0.0
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.log_metric("timing/policy", time.perf_counter() - start - self._generation_seconds)
        return loss

    def _generate(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The no-grad part of a step for a whole generation batch; by default the prompts' text states."""
        return {**inputs, "prompt_embeds": self.encode_prompts(list(inputs["prompt"]))}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        raise NotImplementedError

    # ------------------------------------------------------------------ EMA and samples
    def _on_step_end(self) -> None:
        if self.ema is not None:
            self.ema.step(self._ema_parameters(self.student))
        every = self.args.sample_every_steps
        # Under FSDP every forward pass is a collective: every process generates the sample, the main one writes it.
        if every and self.state.global_step % every == 0 and (self.is_fsdp_enabled or self.is_world_process_zero()):
            self.write_samples(os.path.join(self.args.output_dir, "samples", f"step-{self.state.global_step}.gif"))

    @torch.no_grad()
    def decode_videos(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixel videos ``[B, F, 3, H, W]`` in [0, 1] of normalised latents ``[B, C, F', h, w]`` (the VAE's decoding of
        the whole clip equals the pipeline's chunk-by-chunk decoding)."""
        vae = self.pipeline.vae
        pixels = vae.decode(denormalize_latents(latents.to(vae.dtype), vae), return_dict=False)[0]
        return self.pipeline.video_processor.postprocess_video(pixels, output_type="pt")

    @torch.no_grad()
    def generate_videos(self, prompts: list[str], seeds: Sequence[int]) -> torch.Tensor:
        """The student's videos ``[B, F, 3, H, W]`` in [0, 1] for ``prompts`` at the training size and sampler
        settings, one seed per video (so a video does not depend on its batch or process)."""
        out = self.pipeline(
            prompt_embeds=self.encode_prompts(prompts), num_frames=self.args.num_frames, height=self.height,
            width=self.width, sigmas=self.args.denoising_sigmas,
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds], window_frames=self.args.window_frames,
            sink_frames=self.args.sink_frames, context_noise=self.args.context_noise, output_type="pt",
        )
        return out.frames

    @torch.no_grad()
    def write_samples(self, path: str) -> str:
        """A sample video of the first sample prompt (seed ``seed``) at ``path``; with reward functions, its rewards
        beside it (same name, ``.json``). Under FSDP every process calls it and the main process writes."""
        from ..utils.video import save_video

        prompts = (self.args.sample_prompts or [self._first_prompt()])[:1]
        video = self.generate_videos(prompts, [self.args.seed])
        if not self.is_world_process_zero():
            return path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_video(video[0].permute(0, 2, 3, 1).float().cpu().numpy(), path)
        if self.reward_funcs:
            scores = score_videos(self.reward_funcs, prompts, video)[0].tolist()
            with open(os.path.splitext(path)[0] + ".json", "w") as f:
                json.dump({"prompt": prompts[0], "step": self.state.global_step,
                           "rewards": {reward_name(fn): None if math.isnan(v) else v
                                       for fn, v in zip(self.reward_funcs, scores)}}, f, indent=2)
        return path

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Score the model's own videos for the eval prompts with the reward functions.

        Every process generates its share of the prompts (video ``i`` with seed ``seed + i``, whatever the process
        count); the scores are gathered and reported as ``<prefix>_reward`` (weighted sum; ``reward_weights``),
        ``<prefix>_reward_std`` and ``<prefix>_rewards/<name>/mean`` / ``/std`` (samples without a score left
        out)."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if dataset is None:
            raise ValueError("`evaluate()` needs an `eval_dataset` (a `datasets.Dataset` with a `prompt` column).")
        if isinstance(dataset, dict):
            metrics = {}
            for name, part in dataset.items():
                metrics.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        if not self.reward_funcs:
            raise ValueError("`evaluate()` scores videos with reward functions: pass `reward_funcs` to the trainer.")
        was_training = self.model.training
        self.model.eval()
        rank, world = self.args.process_index, self.args.world_size
        batch = self.args.per_device_eval_batch_size
        mine = list(range(rank, len(dataset), world))
        batches = [mine[start : start + batch] for start in range(0, len(mine), batch)]
        if self.is_fsdp_enabled:  # every forward pass is a collective: as many batches on every process
            batches += [None] * (-(-len(dataset) // (world * batch)) - len(batches))
        rows = []
        for index in batches:
            if index is None:  # a stand-in batch, generated and dropped
                self.generate_videos([dataset[0]["prompt"]], [self.args.seed])
                continue
            columns = dataset[index]
            prompts = list(columns.pop("prompt"))
            videos = self.generate_videos(prompts, [self.args.seed + i for i in index])
            rows.append(score_videos(self.reward_funcs, prompts, videos, columns))
        local = torch.cat(rows) if rows else torch.empty(0, len(self.reward_funcs), dtype=torch.float64)
        # Equal sizes for the gather: pad with rows marked as padding, dropped after it.
        size = -(-len(dataset) // world)
        padded = torch.full((size, len(self.reward_funcs) + 1), float("nan"), dtype=torch.float64)
        padded[: len(local), :-1] = local
        padded[: len(local), -1] = 1.0
        gathered = self.accelerator.gather(padded.to(self.accelerator.device)).cpu()
        scores = gathered[gathered[:, -1] == 1.0, :-1]
        metrics = self._reward_metrics(scores, metric_key_prefix)
        self.log(metrics)  # in eval mode, so the pending training metrics stay for the next training log
        if was_training:
            self.model.train()
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _reward_metrics(self, scores: torch.Tensor, prefix: str) -> dict[str, float]:
        weights = torch.tensor(self.args.reward_weights or [1.0] * len(self.reward_funcs), dtype=torch.float64)
        total = (scores * weights).nansum(dim=1)
        metrics = {f"{prefix}_reward": float(total.mean()), f"{prefix}_reward_std": float(total.std(unbiased=False))}
        for j, fn in enumerate(self.reward_funcs):
            column = scores[:, j][~torch.isnan(scores[:, j])]
            name = reward_name(fn)
            metrics[f"{prefix}_rewards/{name}/mean"] = float(column.mean()) if len(column) else float("nan")
            metrics[f"{prefix}_rewards/{name}/std"] = float(column.std(unbiased=False)) if len(column) else float("nan")
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def extra_state(self) -> dict[str, Any]:
        """Modules and optimizers beyond Trainer's own, saved in every checkpoint (override and extend)."""
        return {}

    def _unwrap(self, obj):
        return self.accelerator.unwrap_model(obj) if isinstance(obj, torch.nn.Module) else obj

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.is_fsdp_enabled:
            # The student is written once, in transformer/ (``_save``, from the gathered weights); only the optimizer
            # goes through accelerate's FSDP checkpointing (its model file would be a second copy of the student).
            from accelerate.utils import save_fsdp_optimizer

            save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model,
                                output_dir)
            if self.args.should_save:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        else:
            super()._save_optimizer_and_scheduler(output_dir)
        folder = os.path.join(output_dir, EXTRA_STATE_DIR)
        if self._buffered_inputs is not None and self._step % (self.args.steps_per_generation * self.num_iterations):
            # Mid-way through a generation batch's iterations: every process's rollouts, for an exact resume.
            os.makedirs(folder, exist_ok=True)
            torch.save(self._buffered_inputs, os.path.join(folder, self._buffer_file()))
        states = self._gather_extra_states()  # collectives under FSDP: before the other processes return
        if not self.args.should_save:
            return
        os.makedirs(folder, exist_ok=True)
        for name, state in states.items():
            torch.save(state, os.path.join(folder, f"{name}.pt"))

    def _buffer_file(self) -> str:
        return BUFFER_FILE if self.args.world_size == 1 else BUFFER_FILE.replace(".pt", f"_rank{self.args.process_index}.pt")

    def _gather_extra_states(self) -> dict[str, Any]:
        """The states a checkpoint holds besides Trainer's: the EMA and :meth:`extra_state`, full (gathered under
        FSDP; an optimizer's state then in ``torch.distributed.checkpoint``'s format, keyed by parameter names)."""
        states: dict[str, Any] = {}
        if self.ema is not None:
            states["ema"] = {**self.ema.state_dict(), "shadow_params": self._ema_full_shadows()}
        extra = self.extra_state()
        for name, obj in extra.items():
            obj = self._unwrap(obj)
            if not self.is_fsdp_enabled:
                states[name] = obj.state_dict()
            elif isinstance(obj, torch.nn.Module):
                states[name] = fsdp.gather_state_dict(obj)
            elif isinstance(obj, torch.optim.Optimizer):
                states[name] = fsdp.gather_optimizer_state(self._optimizer_owner(name, obj, extra), obj)
            else:  # e.g. copies of (sharded) weights: their full tensors
                states[name] = {k: fsdp.full_tensor(v) if torch.is_tensor(v) else v for k, v in obj.state_dict().items()}
        return states

    def _optimizer_owner(self, name: str, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> torch.nn.Module:
        """The module (among the student and :meth:`extra_state`'s modules) whose parameters ``optimizer`` holds."""
        first = optimizer.param_groups[0]["params"][0]
        for module in [self.student, *(self._unwrap(m) for m in extra.values() if isinstance(m, torch.nn.Module))]:
            if any(p is first for p in module.parameters()):
                return module
        raise ValueError(f"The optimizer `{name}` of `extra_state()` holds parameters of no module listed there.")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        self._shard_ema()
        folder = os.path.join(checkpoint, EXTRA_STATE_DIR)
        extra = self.extra_state()
        names = (["ema"] if self.ema is not None else []) + list(extra)
        device = self.accelerator.device
        device = "cpu" if device.type == "cpu" else device  # torch.load does not restore to "cpu:0" (gloo runs)
        buffer = os.path.join(folder, self._buffer_file())
        if os.path.exists(buffer):  # written by this package's own trainer: tensors and rollout records
            self._resumed_buffer = torch.load(buffer, map_location=device, weights_only=False)
        for name in names:
            path = os.path.join(folder, f"{name}.pt")
            if not os.path.exists(path):
                raise FileNotFoundError(f"Checkpoint {checkpoint} has no {name} state ({path}).")
            state = torch.load(path, map_location=device, weights_only=True)
            if name == "ema":
                self.ema.load_state_dict(state)
                self._shard_ema()
                continue
            obj = self._unwrap(extra[name])
            if not self.is_fsdp_enabled:
                obj.load_state_dict(state)
            elif isinstance(obj, torch.nn.Module):
                fsdp.load_state_dict(obj, state)
            elif isinstance(obj, torch.optim.Optimizer):
                fsdp.load_optimizer_state(self._optimizer_owner(name, obj, extra), obj, state)
            else:
                obj.load_state_dict(state)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints and ``save_model`` write the student as a diffusers folder (or a LoRA adapter); under FSDP from
        the full ``state_dict`` Trainer gathered."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        student = self.student if state_dict is None else self._student_from_state(
            {fsdp.clean_name(k): v for k, v in state_dict.items()})
        if self.peft_config is not None:
            student.save_lora_adapter(os.path.join(output_dir, "transformer_lora"))
        else:
            student.save_pretrained(os.path.join(output_dir, "transformer"))
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load the student of a checkpoint (sharded under FSDP: each process keeps its shard)."""
        student = self.student
        if self.peft_config is not None:
            from peft.utils import set_peft_model_state_dict

            adapter = load_file(os.path.join(resume_from_checkpoint, "transformer_lora", "pytorch_lora_weights.safetensors"))
            adapter = {k.removeprefix("transformer."): v for k, v in adapter.items()}
            if not self.is_fsdp_enabled:
                set_peft_model_state_dict(student, adapter)
                return
            # The model's names of the adapter's tensors carry the adapter name ("lora_A.default.weight").
            names = {k.replace(".default.", "."): k for k in student.state_dict() if ".default." in k}
            missing = sorted(set(names) - set(adapter))
            if missing:
                raise ValueError(f"Checkpoint {resume_from_checkpoint} lacks LoRA weights: {missing[:3]}...")
            fsdp.load_state_dict(student, {names[k]: adapter[k] for k in names}, strict=False)
            return
        folder = os.path.join(resume_from_checkpoint, "transformer")
        fsdp.load_state_dict(student, load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors")))

    # ------------------------------------------------------------------ export
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (``checkpoint-*`` folders) hold the raw student for resuming; any other folder (the default
        ``output_dir``, also before ``push_to_hub``) gets a loadable pipeline and a model card. Under FSDP every
        process calls it (the weights are gathered)."""
        if output_dir is not None and os.path.basename(os.path.normpath(output_dir)).startswith("checkpoint-"):
            return super().save_model(output_dir, _internal_call)
        self.save_pipeline(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    @torch.no_grad()
    def export_transformer(self, use_ema: bool = True) -> CausalWanTransformer3DModel:
        """A standalone copy of the student: EMA weights when available, a LoRA adapter fused into the weights.
        Under FSDP the full weights are gathered, so every process calls it (each gets the copy, in host memory)."""
        return self._export_transformer(use_ema)

    def _export_transformer(self, use_ema: bool, adapter_dir: str | None = None) -> CausalWanTransformer3DModel:
        exported = self._standalone_student()
        if adapter_dir is not None and self.is_world_process_zero():
            exported.save_lora_adapter(adapter_dir)  # the trained adapter itself, before the EMA and the fusion
        if use_ema and self.ema is not None:
            for param, shadow in zip(self._ema_parameters(exported), self._ema_full_shadows()):
                param.data.copy_(shadow.to(param.device))
        if self.peft_config is not None:
            exported.fuse_lora()
            exported.unload_lora()
        return exported.requires_grad_(False)

    def save_pipeline(self, output_dir: str | None = None, use_ema: bool = True) -> str:
        """Write a loadable :class:`CausalVideoPipeline` folder (EMA weights when available; LoRA fused, and the
        adapter itself in ``transformer_lora/``) and a model card. Under FSDP every process calls it; the main process
        writes."""
        output_dir = output_dir or self.args.output_dir
        adapter_dir = os.path.join(output_dir, "transformer_lora") if self.peft_config is not None else None
        if not self.is_fsdp_enabled and not self.is_world_process_zero():
            return output_dir
        transformer = self._export_transformer(use_ema, adapter_dir)
        if not self.is_world_process_zero():
            return output_dir
        components = dict(self.pipeline.components)
        components["transformer"] = transformer
        sizes = {k: getattr(self.pipeline.config, k, None) for k in ("sample_height", "sample_width")}
        CausalVideoPipeline(**components, **sizes).save_pretrained(output_dir)
        self.create_model_card(output_dir)
        return output_dir
        """Method-specific lines of the model card's training section."""
        return {}

    #: Logged metrics the model card plots against the step (``(metric, title)``), when they were logged.
    _card_curves: tuple[tuple[str, str], ...] = ()

    def _plot_curves(self, output_dir: str) -> list[tuple[str, str]]:
        """Write a PNG per curve of ``_card_curves`` found in the log history; returns ``(title, file name)``."""
        plots = []
        for metric, title in self._card_curves:
            points = [(h["step"], h[metric]) for h in self.state.log_history if metric in h and "step" in h]
            if not points:
                continue
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            name = metric.replace("/", "_") + "_curve.png"
            fig, ax = plt.subplots(figsize=(5, 3))
            ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
            ax.set_xlabel("step")
            ax.set_ylabel(metric)
            ax.set_title(title)
            fig.tight_layout()
            fig.savefig(os.path.join(output_dir, name), dpi=100)
            plt.close(fig)
            plots.append((title, name))
        return plots

    def create_model_card(self, output_dir: str | None = None, model_name: str | None = None, tags=None,
                          **kwargs) -> str:
        """Write ``README.md``: a ``huggingface_hub.ModelCard`` with the method, the usage, the training settings,
        the last logged metrics and the citation (as TRL writes its cards)."""
        from huggingface_hub import ModelCard, ModelCardData

        output_dir = output_dir or self.args.output_dir
        base_model = self.student.config.get("_name_or_path") or None
        tag_list = list(dict.fromkeys([*self._tag_names, *([tags] if isinstance(tags, str) else tags or [])]))
        card_data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-video", tags=tag_list,
                                  base_model=base_model if base_model and not os.path.isdir(base_model) else None)
        metrics = dict(self.state.log_history[-1]) if self.state.log_history else {}
        config = {k: v for k, v in self.args.to_dict().items() if not k.startswith("_") and "token" not in k}
        os.makedirs(output_dir, exist_ok=True)
        card = ModelCard.from_template(
            card_data,
            template_str=MODEL_CARD_TEMPLATE,
            model_name=model_name or os.path.basename(os.path.abspath(output_dir)),
            method=self._method_name,
            repo=self.args.hub_model_id or output_dir,
            fields={**self.model_card_fields(), "steps": self.state.global_step},
            metrics=json.dumps(metrics, indent=2, default=str),
            config=json.dumps(config, indent=2, default=str),
            citation=self._citation.strip(),
            plots=self._plot_curves(output_dir),
        )
        path = os.path.join(output_dir, "README.md")
        card.save(path)
        return path


MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A causal, streaming text-to-video generator trained with **{{ method }}** in
[diffusers-raven](https://pypi.org/project/diffusers-raven/).

```python
from diffusers_raven import CausalVideoPipeline

pipe = CausalVideoPipeline.from_pretrained("{{ repo }}")
for chunk in pipe.stream("your prompt", num_frames=81):
    ...
```

## Training

{% for key, value in fields.items() %}- **{{ key }}**: {{ value }}
{% endfor %}
{% for title, file in plots %}
![{{ title }}]({{ file }})
{% endfor %}
## Metrics (last log)

```json
{{ metrics }}
```

## Configuration

```json
{{ config }}
```
{% if citation %}
## Citation

```bibtex
{{ citation }}
```
{% endif %}
"""
