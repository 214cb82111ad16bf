"""ShapesWorld model chain, stage 3: a small bidirectional Wan teacher trained with rectified-flow matching.

    python trainers/shapes_teacher.py --config trainers/shapes_teacher.yaml
    python trainers/shapes_teacher.py --config trainers/shapes_teacher.yaml --resume last   # continue a run
    torchrun --nproc_per_node 2 trainers/shapes_teacher.py --config ...                     # two CPU processes
    python trainers/shapes_teacher.py --config trainers/shapes_teacher.yaml --compile --learning_rate 1e-3

The configuration is read as TRL's scripts read theirs (``trl.TrlParser``): the YAML ``--config`` sets fields of
:class:`ShapesTeacherConfig`, any field is also a flag (``--vae_path out/vae4x/vae --patch_size 4``), and a misspelt
key fails naming the closest field.

Inputs: the frozen text stack of stage 1 (``tokenizer/``, ``text_encoder/``) and the VAE of stage 2 (``vae/``, with
``latents_mean``/``latents_std`` set). The transformer's ``in_channels`` and ``text_dim`` are read from them.

Every step renders ``fresh_videos_per_step`` new training-split scenes (``sample_scene(seed, split="train")``; the
``n``-th rendered scene has seed ``train_seed + n``), encodes them with the frozen VAE (posterior mode, or a posterior
sample) and normalises the latents (``normalize_latents``). On a CPU, encoding a whole batch costs about as much as
the transformer step, so the rest of the batch is drawn from a ring buffer of the ``latent_pool_size`` most recently
encoded videos (each video is then used about ``batch_size / fresh_videos_per_step`` times);
``fresh_videos_per_step = batch_size`` makes every batch entirely fresh. Captions go through the frozen text encoder
once (embeddings are cached per caption); with probability ``caption_dropout`` a caption is replaced by the empty
prompt, so the model also learns the unconditional velocity that classifier-free guidance needs.

Rectified flow (METHOD.md §0): ``x_σ = (1 − σ) x0 + σ ε``, timestep ``1000 σ``, loss ``‖v_θ(x_σ, σ) − (ε − x0)‖²``.
The training sigmas are ``σ = shift_s(u)`` with ``u ~ U(0, 1)`` and ``s = train_shift`` (default 5, the shift of the
sampler): the teacher's Euler sampler puts its steps uniformly in ``u`` on the same shifted grid, so with equal shifts
every sampler step is trained as often as any other, and the high-noise region, where the four few-step sigmas of
the student lie (METHOD §1), gets most of the updates. ``sigma_sampling: logit_normal`` (SD3: ``σ = sigmoid(m + s·z)``)
is the alternative.

The loop runs on ``accelerate`` (an ``Accelerator`` on the CPU). AdamW with ``transformers``' ``cosine_with_min_lr``
schedule: linear warm-up from 0 over ``warmup_steps``, then a cosine to ``min_lr_ratio`` times the peak at
``max_steps``; after the warm-up the schedule's step count is moved ahead to the time budget's share of the cosine
when that is further (``diffusers_raven.utils.recipes.schedule_position``), so a run cut short by its time budget
still anneals. An EMA of the weights (``diffusers.training_utils.EMAModel``: decay ``min(ema_decay, (1 + n) / (10 +
n))`` after ``n`` updates, the first update copying the weights) is what evaluation uses and what is saved.

Evaluation every ``eval_every_steps`` and at the end: held-out-caption videos (``sample_scene(eval_seed + i,
split="test")``) sampled from noise with ``eval_num_steps`` Euler steps on the shift-``eval_shift`` grid and
classifier-free guidance ``eval_guidance_scale`` (``teacher_ode_trajectory``), decoded with the VAE and scored with
``evaluate_batch``. Each evaluation also records the EMA model's ``caption_sensitivity`` at the noise levels
``eval_sensitivity_sigmas``: on the same scenes' ground truth, the rise of its flow-matching loss when one caption
attribute is edited (``edit_scene``) or the caption is dropped, a low-noise sign of which attributes it has learnt to
read. Once, at the start, the same scenes' ground truth is encoded and decoded by the VAE and scored:
the ceiling the teacher can reach through this VAE.

Checkpoints: every ``checkpoint_every_steps`` (and at the end) ``Accelerator.save_state`` writes the model,
optimizer, learning-rate schedule, RNG states, the EMA and the run's progress (step, elapsed training time, scenes
rendered, data generator, latent pool, curves) to ``<output_dir>/teacher_checkpoints/checkpoint-<step>``: written
under a temporary name and renamed once complete; the two newest are kept. ``--resume last`` (or a checkpoint
folder) continues from it with ``Accelerator.load_state``: a run killed after a checkpoint and resumed takes the same
steps as one that was never stopped. SIGTERM or Ctrl-C ends the loop after the current step and still evaluates and
saves.

Several processes (``torchrun --nproc_per_node N trainers/shapes_teacher.py ...``: gloo ranks on the CPU) train one
model on N cores: every rank renders and encodes ``fresh_videos_per_step / N`` of the fresh videos, the encoded
latents are gathered (``accelerator.gather``) so that every rank keeps the same pool, every rank draws the whole
batch's pool picks, caption dropout, sigmas and noise from the same generator, and each runs the forward and backward
pass of its ``batch_size / N`` rows; ``DistributedDataParallel`` (``accelerator.prepare``) then averages the
gradients, and ``accelerator.reduce`` the logged loss. A step is thus the single-process step on the same batch, up
to the order of float sums, and a checkpoint (the bare model's weights) resumes under any number of processes that
divides ``batch_size`` and ``fresh_videos_per_step``. Rank 0's clock decides the learning rate and the time budget,
and SIGTERM on rank 0 ends the run on every rank; evaluation batches are shared out between the ranks.

``compile: true`` runs the training forward and backward through ``torch.compile`` (inductor, which needs a C++
compiler): the first step compiles (55 s measured with a cold kernel cache), every later one is faster (1.27-1.30x
per step, ``docs/experiments/shapesworld/results/shapes_teacher_compile_speed.json``); evaluation stays eager.

Outputs in ``output_dir``: ``teacher/`` (``WanTransformer3DModel.save_pretrained``, EMA weights) and
``teacher_metrics.json`` (loss curve, every evaluation, wall time, config, command).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, gather_object
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.training_utils import EMAModel
from transformers import AutoTokenizer, UMT5EncoderModel, get_scheduler

from diffusers_raven.pipelines.vae_streaming import denormalize_latents, normalize_latents, vae_spatial_factor
from diffusers_raven.shapes import EDITABLE_ATTRIBUTES, caption, edit_scene, evaluate_batch, render_video, sample_scene
from diffusers_raven.shapes.sensitivity import caption_loss_gaps, summarize_gaps
from diffusers_raven.training import flow_matching_loss, teacher_ode_trajectory
from diffusers_raven.utils.recipe_args import parse_recipe_args
from diffusers_raven.utils.recipes import (
    portable_checkpoints,
    resolve_checkpoint,
    resume_training,
    save_checkpoint,
    schedule_position,
    set_schedule_position,
)
from diffusers_raven.utils.text import encode_prompts

SIGMA_SAMPLINGS = ("shifted_uniform", "logit_normal")
LATENT_SAMPLINGS = ("mode", "sample")
CHECKPOINT_DIR = "teacher_checkpoints"
SUMMARY_METRICS = ("semantic_accuracy", "psnr", "physics_accuracy", "speed_error", "direction_error", "consistency")


@dataclass
class ShapesTeacherConfig:
    """Configuration of the ShapesWorld teacher recipe (every field can be set in the YAML file).

    Parameters that control the inputs: ``tokenizer_path``, ``text_encoder_path``, ``vae_path``.
    Parameters that control the model: ``num_layers``, ``num_attention_heads``, ``attention_head_dim``,
    ``ffn_dim`` (the width is heads × head dim), ``freq_dim``, ``patch_size``, ``model_seed``, ``init_from``.
    Parameters that control the data: ``num_frames`` (1 + 4k), ``height``, ``width``, ``batch_size``,
    ``fresh_videos_per_step``, ``latent_pool_size``, ``train_seed``, ``latent_sampling``, ``max_sequence_length``, ``caption_dropout``.
    Parameters that control the training: ``sigma_sampling``, ``train_shift``, ``logit_mean``, ``logit_std``,
    ``learning_rate``, ``min_lr_ratio``, ``warmup_steps``, ``weight_decay``, ``adam_betas``, ``max_grad_norm``,
    ``ema_decay``, ``max_steps``, ``time_budget_minutes``, ``log_every_steps``, ``checkpoint_every_steps``.
    Parameters that control the evaluation: ``eval_*``.
    Parameters that control the computation: ``num_threads``, ``compile``.
    """

    # inputs
    tokenizer_path: str = field(default="out/shapes/tokenizer", metadata={"help": "stage 1 tokenizer folder"})
    text_encoder_path: str = field(default="out/shapes/text_encoder", metadata={"help": "stage 1 UMT5 encoder"})
    vae_path: str = field(default="out/shapes/vae", metadata={"help": "stage 2 AutoencoderKLWan folder"})
    # model
    num_layers: int = field(default=6, metadata={"help": "transformer blocks"})
    num_attention_heads: int = field(default=4, metadata={"help": "attention heads"})
    attention_head_dim: int = field(default=48, metadata={"help": "head dim; rotary split h=w=2*(d//6), t=rest"})
    ffn_dim: int = field(default=768, metadata={"help": "feed-forward size (4x the width by default)"})
    freq_dim: int = field(default=64, metadata={"help": "sinusoidal timestep-embedding size"})
    patch_size: int = field(default=2, metadata={"help": "latent pixels per token along height and width"})
    model_seed: int = field(default=0, metadata={"help": "seed of the random initialisation"})
    init_from: str | None = field(
        default=None, metadata={"help": "a saved WanTransformer3DModel folder whose weights start the model and its "
                                "EMA instead of the random initialisation (fine-tuning; its sizes must match)"})
    # data
    num_frames: int = field(default=21, metadata={"help": "frames per training video (1 + 4k)"})
    height: int = field(default=64, metadata={"help": "pixel height (multiple of VAE factor x patch_size)"})
    width: int = field(default=64, metadata={"help": "pixel width"})
    batch_size: int = field(default=8, metadata={"help": "videos per step"})
    fresh_videos_per_step: int | None = field(default=None, metadata={"help": "newly rendered videos per step "
                                              "(None: batch_size); the rest of the batch comes from the pool"})
    latent_pool_size: int = field(default=512, metadata={"help": "most recent encoded videos kept for reuse"})
    train_seed: int = field(default=0, metadata={"help": "the n-th rendered training scene has seed train_seed + n"})
    latent_sampling: str = field(default="mode", metadata={"help": "VAE posterior 'mode' or 'sample'"})
    max_sequence_length: int | None = field(default=None, metadata={"help": "text tokens (None: tokenizer's max)"})
    caption_dropout: float = field(default=0.1, metadata={"help": "probability of the empty prompt (for CFG)"})
    # training
    sigma_sampling: str = field(default="shifted_uniform", metadata={"help": "'shifted_uniform' or 'logit_normal'"})
    train_shift: float = field(default=5.0, metadata={"help": "shift of the shifted-uniform sigma sampling"})
    logit_mean: float = field(default=0.0, metadata={"help": "mean of the logit-normal sigma sampling"})
    logit_std: float = field(default=1.0, metadata={"help": "std of the logit-normal sigma sampling"})
    learning_rate: float = field(default=3e-4, metadata={"help": "peak AdamW learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate / peak"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"help": "AdamW betas"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay (warmed up); the EMA is evaluated and saved"})
    max_steps: int = field(default=100_000, metadata={"help": "stop after this many steps"})
    time_budget_minutes: float = field(default=50.0, metadata={"help": "stop training after this much time"})
    log_every_steps: int = field(default=10, metadata={"help": "loss-curve interval"})
    checkpoint_every_steps: int = field(default=250, metadata={"help": "checkpoint interval (0 disables)"})
    # evaluation
    eval_every_steps: int = field(default=500, metadata={"help": "evaluate every this many steps (0: only at end)"})
    eval_num_videos: int = field(default=8, metadata={"help": "held-out-caption videos per evaluation"})
    eval_seed: int = field(default=1_000_000_000, metadata={"help": "first held-out scene seed"})
    eval_num_steps: int = field(default=48, metadata={"help": "Euler steps of the sampler"})
    eval_shift: float = field(default=5.0, metadata={"help": "shift of the sampler's sigma grid (METHOD §0)"})
    eval_guidance_scale: float = field(default=3.0, metadata={"help": "classifier-free guidance of the sampler"})
    eval_batch_size: int = field(default=8, metadata={"help": "videos per sampler batch"})
    eval_sensitivity_sigmas: list[float] = field(
        default_factory=lambda: [0.9, 0.7, 0.5, 0.3],
        metadata={"help": "noise levels of the caption sensitivity recorded at each evaluation ([]: none)"})
    # outputs
    output_dir: str = field(default="out/shapes", metadata={"help": "where teacher/ and the metrics go"})
    num_threads: int = field(default=1, metadata={"help": "torch CPU threads (more oversubscribe a shared CPU)"})
    compile: bool = field(default=False, metadata={"help": "train through torch.compile(model) (inductor; needs a C++ "
                                                   "compiler; the first step compiles, about a minute)"})

    def __post_init__(self) -> None:
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames={self.num_frames} must be 1 + 4k (Wan's 4x temporal compression)")
        if self.height <= 0 or self.width <= 0:  # multiples of VAE factor x patch_size: checked once the VAE is loaded
            raise ValueError(f"height x width = {self.height}x{self.width} must be positive")
        d = self.attention_head_dim
        h_dim, t_dim = 2 * (d // 6), d - 4 * (d // 6)
        if h_dim <= 0 or t_dim <= 0 or t_dim % 2:
            raise ValueError(f"attention_head_dim={d} gives odd/empty rotary parts (t={t_dim}, h=w={h_dim})")
        for name in ("num_layers", "num_attention_heads", "ffn_dim", "freq_dim", "patch_size", "batch_size",
                     "max_steps", "log_every_steps", "eval_num_videos", "eval_num_steps", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.fresh_videos_per_step is None:
            self.fresh_videos_per_step = self.batch_size
        if not 1 <= self.fresh_videos_per_step <= self.batch_size:
            raise ValueError(f"fresh_videos_per_step={self.fresh_videos_per_step} must be in [1, batch_size]")
        if self.latent_pool_size < self.batch_size:
            raise ValueError(f"latent_pool_size={self.latent_pool_size} must be >= batch_size={self.batch_size}")
        if self.latent_sampling not in LATENT_SAMPLINGS:
            raise ValueError(f"latent_sampling must be one of {LATENT_SAMPLINGS}, got {self.latent_sampling!r}")
        if self.sigma_sampling not in SIGMA_SAMPLINGS:
            raise ValueError(f"sigma_sampling must be one of {SIGMA_SAMPLINGS}, got {self.sigma_sampling!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout={self.caption_dropout} must be in [0, 1)")
        if self.train_shift <= 0 or self.eval_shift <= 0 or self.logit_std <= 0:
            raise ValueError("train_shift, eval_shift and logit_std must be positive")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1)")
        if len(self.adam_betas) != 2:
            raise ValueError(f"adam_betas needs two values, got {self.adam_betas}")
        if self.time_budget_minutes <= 0:
            raise ValueError(f"time_budget_minutes={self.time_budget_minutes} must be positive")
        if not all(0.0 < float(s) <= 1.0 for s in self.eval_sensitivity_sigmas):
            raise ValueError(f"eval_sensitivity_sigmas={self.eval_sensitivity_sigmas} must lie in (0, 1]")
        if self.eval_every_steps < 0 or self.checkpoint_every_steps < 0 or self.warmup_steps < 0:
            raise ValueError("eval_every_steps, checkpoint_every_steps and warmup_steps must be >= 0")


@dataclass
class ShapesTeacherScriptArguments:
    """What the command line adds to the config."""

    resume: str | None = field(default=None, metadata={"help": "a checkpoint folder (<output_dir>/teacher_checkpoints/"
                                                               "checkpoint-<step>), or 'last' for <output_dir>'s newest"})
    export_ema: str | None = field(default=None, metadata={
        "help": "do not train: save the EMA model of the checkpoint (--resume, default 'last') to this folder (e.g. to "
                "score a running stage with shapes_eval_chain.py)"})


def load_config(path: str, *flags: str) -> ShapesTeacherConfig:
    """The config of the YAML file ``path`` with ``flags`` (``"--learning_rate", "1e-3"``) on top."""
    return parse_recipe_args((ShapesTeacherConfig, ShapesTeacherScriptArguments), ["--config", path, *flags])[0]


# ------------------------------------------------------------------------------------------------ components
def load_frozen_inputs(config: ShapesTeacherConfig):
    """The stage 1 tokenizer + text encoder and the stage 2 VAE, frozen, in eval mode."""
    for name in ("tokenizer_path", "text_encoder_path", "vae_path"):
        if not os.path.isdir(getattr(config, name)):
            raise ValueError(f"{name}={getattr(config, name)!r} is not a folder (run the earlier chain stages)")
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_path)
    text_encoder = UMT5EncoderModel.from_pretrained(config.text_encoder_path).eval().requires_grad_(False)
    vae = AutoencoderKLWan.from_pretrained(config.vae_path).eval().requires_grad_(False)
    if vae.config.latents_mean is None or vae.config.latents_std is None:
        raise ValueError(f"the VAE in {config.vae_path} has no latents_mean/latents_std (stage 2 sets them)")
    return tokenizer, text_encoder, vae


def teacher_config(config: ShapesTeacherConfig, in_channels: int, text_dim: int) -> dict:
    """``WanTransformer3DModel`` kwargs: the config's sizes, the VAE's channels and the text encoder's width."""
    return {
        "patch_size": (1, config.patch_size, config.patch_size),
        "num_attention_heads": config.num_attention_heads,
        "attention_head_dim": config.attention_head_dim,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "text_dim": text_dim,
        "freq_dim": config.freq_dim,
        "ffn_dim": config.ffn_dim,
        "num_layers": config.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 1024,
    }


class CaptionEmbeddings:
    """Frozen text-encoder states per caption, computed once (``""`` is the unconditional prompt)."""

    def __init__(self, tokenizer, text_encoder, max_sequence_length: int) -> None:
        self.tokenizer, self.text_encoder, self.max_sequence_length = tokenizer, text_encoder, max_sequence_length
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            embeds = encode_prompts(self.tokenizer, self.text_encoder, missing, self.max_sequence_length)
            self.cache.update(zip(missing, embeds))
        return torch.stack([self.cache[c] for c in captions])


# ------------------------------------------------------------------------------------------------ data
def render_scenes(seeds: list[int], split: str, config: ShapesTeacherConfig) -> tuple[torch.Tensor, list[str]]:
    """One ``split`` scene per seed: float videos ``[B, 3, F, H, W]`` in [-1, 1] and their captions."""
    scenes = [sample_scene(seed, split=split, height=config.height, width=config.width) for seed in seeds]
    videos = np.stack([render_video(scene, config.num_frames) for scene in scenes])  # [B, F, H, W, 3]
    pixels = torch.from_numpy(videos).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    return pixels, [caption(scene) for scene in scenes]


@torch.no_grad()
def encode_videos(vae: AutoencoderKLWan, pixels: torch.Tensor, mode: str, generator: torch.Generator,
                  rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Normalised latents ``[B, C, F_latent, h, w]`` (posterior mode or a posterior sample).

    ``rows = (start, total)``: these videos are rows ``start ...`` of ``total`` encoded by all ranks; a posterior
    sample then draws the noise of all ``total`` rows from ``generator`` and uses its own, as one process would."""
    posterior = vae.encode(pixels).latent_dist
    if mode == "mode":
        latents = posterior.mode()
    else:
        start, total = rows if rows is not None else (0, len(pixels))
        noise = torch.randn((total, *posterior.mean.shape[1:]), generator=generator)[start : start + len(pixels)]
        latents = posterior.mean + posterior.std * noise
    return normalize_latents(latents, vae)


class LatentPool:
    """Ring buffer of the most recently encoded training videos: ``(latents [C, F, h, w], caption)`` pairs."""

    def __init__(self, size: int) -> None:
        self.size, self.latents, self.captions, self.next = size, [], [], 0

    def add(self, latents: torch.Tensor, captions: list[str]) -> None:
        for x, text in zip(latents, captions):
            if len(self.latents) < self.size:
                self.latents.append(x)
                self.captions.append(text)
            else:
                self.latents[self.next], self.captions[self.next] = x, text
                self.next = (self.next + 1) % self.size

    def draw(self, n: int, generator: torch.Generator) -> tuple[list[torch.Tensor], list[str]]:
        """``n`` distinct entries, uniformly."""
        picks = torch.randperm(len(self.latents), generator=generator)[:n].tolist()
        return [self.latents[i] for i in picks], [self.captions[i] for i in picks]

    def state_dict(self) -> dict:
        return {"latents": self.latents, "captions": self.captions, "next": self.next}

    def load_state_dict(self, state: dict) -> None:
        self.latents, self.captions, self.next = list(state["latents"]), list(state["captions"]), state["next"]


def training_batch(pool: LatentPool, vae, scenes_rendered: int, config, generator: torch.Generator,
                   accelerator: Accelerator | None = None):
    """Draw the batch's reused videos from the pool, render and encode its fresh ones (which then join the pool).
    Returns the whole batch ``(x0 [B, C, F, h, w], captions, number of scenes rendered so far)``.

    With several processes (``accelerator``) each renders and encodes its share of the fresh videos and the latents
    are gathered (``accelerator.gather``), so every rank returns the same batch and keeps the same pool (see the
    module docstring)."""
    rank, world_size = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    fresh = max(config.fresh_videos_per_step, config.batch_size - len(pool.latents))  # the first step is all fresh
    reused, reused_captions = pool.draw(config.batch_size - fresh, generator)
    seeds = [config.train_seed + scenes_rendered + i for i in range(fresh)]
    share = fresh // world_size
    pixels, _ = render_scenes(seeds[rank * share : (rank + 1) * share], "train", config)
    latents = encode_videos(vae, pixels, config.latent_sampling, generator, rows=(rank * share, fresh))
    if world_size > 1:
        latents = accelerator.gather(latents.contiguous())
    captions = [caption(sample_scene(seed, split="train", height=config.height, width=config.width)) for seed in seeds]
    pool.add(latents, captions)
    x0 = torch.cat([latents, torch.stack(reused)]) if reused else latents
    return x0, captions + reused_captions, scenes_rendered + fresh


def sample_sigmas(batch: int, config: ShapesTeacherConfig, generator: torch.Generator) -> torch.Tensor:
    """Training sigmas (see the module docstring): ``shift_s(u)``, ``u ~ U(0, 1)``; or SD3's logit-normal."""
    if config.sigma_sampling == "shifted_uniform":
        u = torch.rand(batch, generator=generator)
        s = config.train_shift
        return s * u / (1 + (s - 1) * u)
    return torch.sigmoid(config.logit_mean + config.logit_std * torch.randn(batch, generator=generator))


def learning_rate_scheduler(optimizer: torch.optim.Optimizer, config: ShapesTeacherConfig):
    """``transformers``' ``cosine_with_min_lr`` schedule: linear warm-up from 0 over ``warmup_steps``, then a cosine
    to ``min_lr_ratio`` times the peak at ``max_steps``. The loop moves its step count ahead with the time budget
    (``schedule_position``)."""
    return get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=config.max_steps,
                         scheduler_specific_kwargs={"min_lr_rate": config.min_lr_ratio})


# ------------------------------------------------------------------------------------------------ evaluation
def to_uint8_videos(pixels: torch.Tensor) -> np.ndarray:
    """``[B, 3, F, H, W]`` in [-1, 1] -> uint8 ``[B, F, H, W, 3]``."""
    return ((pixels.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()


@torch.no_grad()
def decode_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> np.ndarray:
    """Normalised latents -> uint8 videos, one video per decode (bounded memory)."""
    return np.concatenate([to_uint8_videos(vae.decode(denormalize_latents(x[None], vae)).sample) for x in latents])


@torch.no_grad()
def sample_teacher(model, vae, embeddings: CaptionEmbeddings, captions: list[str], config: ShapesTeacherConfig,
                   seed: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Euler sampling of the guided teacher ODE from noise, decoded: uint8 ``[B, F, H, W, 3]``.

    With ``world_size`` processes, rank ``r`` samples the batches ``r, r + world_size, ...`` (every rank draws every
    batch's noise, so each video's noise is the single-process one) and the videos are gathered on every rank
    (``accelerate.utils.gather_object``)."""
    factor = vae_spatial_factor(vae)
    shape = (model.config.in_channels, (config.num_frames - 1) // 4 + 1, config.height // factor,
             config.width // factor)
    generator = torch.Generator().manual_seed(seed)
    videos = {}
    for index, start in enumerate(range(0, len(captions), config.eval_batch_size)):
        batch = captions[start : start + config.eval_batch_size]
        noise = torch.randn((len(batch), *shape), generator=generator)
        if index % world_size != rank:
            continue
        negative = embeddings([""] * len(batch)) if config.eval_guidance_scale != 1.0 else None
        _, x0 = teacher_ode_trajectory(model, noise, embeddings(batch), negative, [1.0], config.eval_guidance_scale,
                                       config.eval_num_steps, config.eval_shift)
        videos[index] = decode_latents(vae, x0)
    if world_size > 1:
        videos = dict(gather_object(list(videos.items())))
    return np.concatenate([videos[k] for k in sorted(videos)])


@torch.no_grad()
def sensitivity_inputs(vae, embeddings: CaptionEmbeddings, seeds: list[int], pixels: torch.Tensor,
                       config: ShapesTeacherConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """What :func:`caption_sensitivity` needs of the held-out scenes ``seeds`` (videos ``pixels``), computed once per
    run: their clean latents, caption states, and the states of the edited captions (``edit_scene`` seeded by the
    scene's seed, one per attribute) and of the empty caption (``"empty"``)."""
    scenes = [sample_scene(seed, split="test", height=config.height, width=config.width) for seed in seeds]
    x0 = torch.cat([encode_videos(vae, p[None], "mode", None) for p in pixels])
    edited = {a: embeddings([caption(edit_scene(s, a, seed)) for s, seed in zip(scenes, seeds)])
              for a in EDITABLE_ATTRIBUTES}
    edited["empty"] = embeddings([""] * len(scenes))
    return x0, embeddings([caption(s) for s in scenes]), edited


def caption_sensitivity(model, inputs: tuple, config: ShapesTeacherConfig) -> dict:
    """``summarize_gaps`` of ``caption_loss_gaps`` on ``inputs`` (:func:`sensitivity_inputs`): how much the model's
    flow-matching loss rises per noise level when one caption attribute is edited or the caption is dropped. The
    noise is seeded by ``config.eval_seed``, so every evaluation of a run uses the same noise."""
    x0, prompt_embeds, edited = inputs
    loss, gaps = caption_loss_gaps(model, x0, prompt_embeds, edited, config.eval_sensitivity_sigmas,
                                   torch.Generator().manual_seed(config.eval_seed))
    return summarize_gaps(config.eval_sensitivity_sigmas, loss, gaps)


def distributed_world() -> tuple[int, int]:
    """``(rank, number of processes)`` as torchrun sets them in the environment (``(0, 1)`` without torchrun), read
    before the ``Accelerator`` starts the process group."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def summary(result: dict) -> dict:
    return {k: result["mean"].get(k) for k in SUMMARY_METRICS}


def fmt(value, digits: int = 3) -> str:
    """A metric for printing (the evaluator gives None for an undefined value)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


# ------------------------------------------------------------------------------------------------ main
class StopFlag:
    """Set by SIGTERM so the loop ends after the current step and the run still saves its results."""

    def __init__(self) -> None:
        self.stop = False

    def __call__(self, signum, frame) -> None:
        self.stop = True


def load_initial_weights(model: WanTransformer3DModel, folder: str) -> None:
    """Copy the weights of the saved teacher in ``folder`` into ``model`` (``init_from``); its sizes must match."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"init_from={folder!r} is not a saved WanTransformer3DModel folder")
    source = WanTransformer3DModel.from_pretrained(folder)
    def plain(value):
        return list(value) if isinstance(value, tuple) else value

    differ = {k: (source.config.get(k), v) for k, v in model.config.items()
              if not k.startswith("_") and plain(source.config.get(k)) != plain(v)}
    if differ:
        raise ValueError(f"init_from={folder!r} has other model settings (saved, configured): {differ}")
    model.load_state_dict(source.state_dict())


class TrainingProgress:
    """What a checkpoint holds besides the model, optimizer, learning-rate schedule, EMA and RNG states that
    ``Accelerator.save_state`` writes: the step, the training seconds so far, the number of scenes rendered, the data
    generator, the latent pool, the curves and the loss summed since the last logged step (registered with
    ``accelerator.register_for_checkpointing``)."""

    RESUMED_RESULTS = ("loss_curve", "evals", "vae_reference")

    def __init__(self, generator: torch.Generator, pool: LatentPool, results: dict) -> None:
        self.step, self.elapsed_seconds, self.scenes_rendered = 0, 0.0, 0
        self.generator, self.pool, self.results = generator, pool, results
        self.running = {"loss": 0.0, "n": 0}
        self.model_config = results.get("model_config")

    def state_dict(self) -> dict:
        return {"step": self.step, "elapsed_seconds": self.elapsed_seconds, "scenes_rendered": self.scenes_rendered,
                "generator": self.generator.get_state(), "pool": self.pool.state_dict(), "results": self.results,
                "running": dict(self.running)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.elapsed_seconds = state["step"], state["elapsed_seconds"]
        self.scenes_rendered, self.running = state["scenes_rendered"], dict(state["running"])
        self.generator.set_state(state["generator"])
        self.pool.load_state_dict(state["pool"])
        for key in self.RESUMED_RESULTS:  # the curves continue; config and command are this run's
            if key in state["results"]:
                self.results[key] = state["results"][key]
        self.model_config = state["results"]["model_config"]


def export_ema(resume: str, config: ShapesTeacherConfig, folder: str) -> dict:
    """Save the EMA weights of a checkpoint (``"last"``: the newest in ``<output_dir>/teacher_checkpoints``) as a
    ``WanTransformer3DModel`` folder, with ``snapshot.json`` (checkpoint, step, training seconds)."""
    path = resolve_checkpoint(resume, os.path.join(config.output_dir, CHECKPOINT_DIR))
    accelerator = Accelerator(cpu=True)
    ema = EMAModel([])  # its weights come from the checkpoint
    progress = TrainingProgress(torch.Generator(), LatentPool(1), {})
    accelerator.register_for_checkpointing(ema, progress)  # the order of main()
    accelerator.load_state(path)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in progress.model_config.items()}
    model = WanTransformer3DModel(**kwargs)
    parameters = list(model.parameters())
    if len(parameters) != len(ema.shadow_params):
        raise ValueError(f"--resume {resume!r}: the EMA in {path} does not fit its model config")
    ema.copy_to(parameters)
    model.save_pretrained(folder)
    info = {"checkpoint": path, "step": progress.step, "elapsed_seconds": round(progress.elapsed_seconds, 1)}
    with open(os.path.join(folder, "snapshot.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(f"saved the EMA model of {path} (step {info['step']}) to {folder}")
    return info


def main(argv: list[str] | None = None) -> dict:
    config, cli = parse_recipe_args((ShapesTeacherConfig, ShapesTeacherScriptArguments), argv, description=__doc__)
    if cli.export_ema is not None:
        return export_ema(cli.resume or "last", config, cli.export_ema)
    _, world_size = distributed_world()
    for name in ("batch_size", "fresh_videos_per_step"):
        if getattr(config, name) % world_size:
            raise ValueError(f"{name}={getattr(config, name)} must be a multiple of the number of processes "
                             f"({world_size}): each process trains on an equal share")
    # the recipe trains on the CPU: several processes are gloo ranks, and the optimizer and schedule step once per
    # step of the whole batch, whatever the number of processes
    accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    rank, world_size = accelerator.process_index, accelerator.num_processes
    launcher = ["python"] if world_size == 1 else ["torchrun", "--nproc_per_node", str(world_size)]
    command = " ".join([*launcher, "trainers/shapes_teacher.py", *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(config.num_threads)
    log = print if accelerator.is_main_process else (lambda *args, **kwargs: None)
    os.makedirs(config.output_dir, exist_ok=True)
    metrics_path = os.path.join(config.output_dir, "teacher_metrics.json")
    checkpoint_root = os.path.join(config.output_dir, CHECKPOINT_DIR)

    tokenizer, text_encoder, vae = load_frozen_inputs(config)
    max_sequence_length = config.max_sequence_length or tokenizer.model_max_length
    embeddings = CaptionEmbeddings(tokenizer, text_encoder, max_sequence_length)
    factor = vae_spatial_factor(vae)
    if config.height % (factor * config.patch_size) or config.width % (factor * config.patch_size):
        raise ValueError(f"height x width = {config.height}x{config.width} must be multiples of the VAE factor "
                         f"{factor} x patch_size {config.patch_size} = {factor * config.patch_size}")
    model_kwargs = teacher_config(config, vae.config.z_dim, text_encoder.config.d_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.model_seed)
        model = WanTransformer3DModel(**model_kwargs)
    if config.init_from is not None:
        load_initial_weights(model, config.init_from)
    ema = EMAModel(model.parameters(), decay=float(config.ema_decay))
    ema_model = copy.deepcopy(model).requires_grad_(False).eval()  # holds the EMA weights to evaluate and save
    model.train()
    num_parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=tuple(config.adam_betas),
                                  weight_decay=config.weight_decay)
    scheduler = learning_rate_scheduler(optimizer, config)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    generator = torch.Generator().manual_seed(config.train_seed)  # sigmas, noise, caption dropout, latent samples

    eval_seeds = [config.eval_seed + i for i in range(config.eval_num_videos)]
    eval_pixels, eval_captions = render_scenes(eval_seeds, "test", config)
    results: dict = {
        "config": asdict(config),
        "command": command,
        "model_config": {k: list(v) if isinstance(v, tuple) else v for k, v in model_kwargs.items()},
        "num_parameters": num_parameters,
        "world_size": world_size,
        "max_sequence_length": max_sequence_length,
        "eval_captions": eval_captions,
        "loss_curve": [],
        "evals": [],
    }
    progress = TrainingProgress(generator, LatentPool(config.latent_pool_size), results)
    accelerator.register_for_checkpointing(ema, progress)
    portable_checkpoints(accelerator)
    if cli.resume is not None:
        path = resume_training(accelerator, cli.resume, checkpoint_root, scheduler, config.learning_rate, results,
                               progress)
        log(f"resumed from {path} at step {progress.step} ({progress.elapsed_seconds:.0f} s of training so far)")
    elapsed_before = progress.elapsed_seconds
    log(f"teacher: {num_parameters:,} parameters ({config.num_layers} layers, width "
        f"{config.num_attention_heads * config.attention_head_dim}); latents {model_kwargs['in_channels']} ch; "
        f"text {model_kwargs['text_dim']}-d x {max_sequence_length} tokens; eval on {len(eval_captions)} "
        f"held-out captions" + (f"; {world_size} processes" if world_size > 1 else ""))

    if "vae_reference" not in results and rank == 0:  # ground truth through the VAE: the ceiling of the teacher's scores
        reference = decode_latents(vae, encode_videos(vae, eval_pixels, "mode", generator))
        results["vae_reference"] = summary(evaluate_batch(list(reference), eval_captions))
        log(f"vae reference (held-out ground truth, encoded + decoded): {results['vae_reference']}")
    sensitivity_data = None  # rank 0 evaluates the caption sensitivity
    if config.eval_sensitivity_sigmas and rank == 0:
        sensitivity_data = sensitivity_inputs(vae, embeddings, eval_seeds, eval_pixels, config)

    def save_metrics(finished: bool) -> None:
        if rank != 0:
            return
        with open(metrics_path, "w") as f:  # a partial file survives a killed run
            json.dump({**results, "finished": finished}, f, indent=2)

    last_eval = results["evals"][-1]["step"] if results["evals"] else None  # the same on every rank

    def record_eval(at_step: int, elapsed: float) -> None:
        nonlocal last_eval
        last_eval = at_step
        start_eval = time.perf_counter()
        ema.copy_to(ema_model.parameters())
        videos = sample_teacher(ema_model, vae, embeddings, eval_captions, config, seed=config.eval_seed, rank=rank,
                                world_size=world_size)
        if rank != 0:
            return
        scores = evaluate_batch(list(videos), eval_captions)
        entry = {"step": at_step, "elapsed_seconds": round(elapsed, 1), **summary(scores)}
        if config.eval_sensitivity_sigmas:
            entry["caption_sensitivity"] = caption_sensitivity(ema_model, sensitivity_data, config)
        entry["eval_seconds"] = round(time.perf_counter() - start_eval, 1)
        results["evals"].append(entry)
        gaps = ""
        if "caption_sensitivity" in entry:
            sensitivity = entry["caption_sensitivity"]
            gaps = f"; caption gaps at sigma {sensitivity['sigmas'][0]:g}: " + ", ".join(
                f"{name} {values[0]:+.4f}" for name, values in sensitivity["gap"].items())
        log(f"eval step {at_step}: semantic {fmt(entry['semantic_accuracy'])} psnr {fmt(entry['psnr'], 2)} "
            f"physics {fmt(entry['physics_accuracy'])}{gaps} ({entry['eval_seconds']:.0f} s)", flush=True)
        save_metrics(False)

    def checkpoint(elapsed: float) -> None:  # on every rank: accelerate writes rank 0's state and each rank's RNG
        progress.elapsed_seconds = elapsed
        save_checkpoint(accelerator, checkpoint_root, progress.step)

    stop = StopFlag()
    previous_handler = signal.signal(signal.SIGTERM, stop)
    budget_seconds = 60.0 * config.time_budget_minutes
    start = time.perf_counter()
    step_seconds: list[float] = []
    stop_reason = "max_steps"
    running = progress.running
    forward = torch.compile(model) if config.compile else model  # same parameters; the EMA is evaluated eagerly
    rows = slice(rank * config.batch_size // world_size, (rank + 1) * config.batch_size // world_size)
    try:
        while progress.step < config.max_steps:
            elapsed, stopping = elapsed_before + time.perf_counter() - start, stop.stop
            if world_size > 1:  # rank 0's clock and signal decide for everyone (same learning rate, same last step)
                shared = broadcast(torch.tensor([elapsed, float(stopping)], dtype=torch.float64), from_process=0)
                elapsed, stopping = shared[0].item(), bool(shared[1].item())
            if elapsed >= budget_seconds:
                stop_reason = "time_budget"
                break
            if stopping:
                stop_reason = "signal"
                break
            step_start = time.perf_counter()
            lr = scheduler.get_last_lr()[0]

            x0, captions, progress.scenes_rendered = training_batch(progress.pool, vae, progress.scenes_rendered,
                                                                    config, generator, accelerator)
            dropped = torch.rand(len(captions), generator=generator) < config.caption_dropout
            text = ["" if d else c for c, d in zip(captions, dropped.tolist())]
            sigma = sample_sigmas(len(captions), config, generator)
            noise = torch.randn(x0.shape, generator=generator)
            x0, noise, sigma, text = x0[rows], noise[rows], sigma[rows], embeddings(text[rows])  # this rank's share
            s = sigma.view(-1, 1, 1, 1, 1)
            noisy = (1 - s) * x0 + s * noise
            velocity = forward(noisy, 1000 * sigma, text).sample
            loss = flow_matching_loss(velocity, noise, x0)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)  # DDP averages the ranks' gradients: the gradient of the whole batch's mean
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            ema.step(model.parameters())
            progress.step += 1
            set_schedule_position(scheduler, schedule_position(progress.step, elapsed, budget_seconds,
                                                           config.warmup_steps, config.max_steps))
            step_seconds.append(time.perf_counter() - step_start)

            running["loss"] += accelerator.reduce(loss.detach(), reduction="mean").item()
            running["n"] += 1
            step = progress.step
            if step % config.log_every_steps == 0 or step == config.max_steps:
                entry = {"step": step, "loss": running["loss"] / running["n"], "grad_norm": float(grad_norm), "lr": lr,
                         "elapsed_seconds": round(elapsed_before + time.perf_counter() - start, 1)}
                results["loss_curve"].append(entry)
                log(f"step {step}: loss {entry['loss']:.4f} grad {entry['grad_norm']:.2f} lr {lr:.2e} "
                    f"({entry['elapsed_seconds']:.0f} s)", flush=True)
                running.update(loss=0.0, n=0)
            if config.eval_every_steps and step % config.eval_every_steps == 0 and step < config.max_steps:
                record_eval(step, elapsed_before + time.perf_counter() - start)
            if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
                checkpoint(elapsed_before + time.perf_counter() - start)
    except KeyboardInterrupt:
        stop_reason = "interrupted"
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    train_seconds = elapsed_before + time.perf_counter() - start
    step = progress.step

    if last_eval != step:
        record_eval(step, train_seconds)
    if config.checkpoint_every_steps:
        checkpoint(train_seconds)
    teacher_dir = os.path.join(config.output_dir, "teacher")
    if rank == 0:
        ema.copy_to(ema_model.parameters())
        ema_model.save_pretrained(teacher_dir)
        final = results["evals"][-1]
        results.update(
            {
                "stop_reason": stop_reason,
                "steps": step,
                "train_videos_seen": step * config.batch_size,
                "train_scenes_rendered": progress.scenes_rendered,
                "train_wall_seconds": round(train_seconds, 1),
                "this_run_steps": len(step_seconds),
                "seconds_per_step": round(float(np.mean(step_seconds)), 3) if step_seconds else None,
                "seconds_per_step_median": round(float(np.median(step_seconds)), 3) if step_seconds else None,
                "final_eval": final,
                "final_loss": results["loss_curve"][-1]["loss"] if results["loss_curve"] else None,
                "distinct_captions_embedded": len(embeddings.cache),
                "total_wall_seconds_this_run": round(time.perf_counter() - start, 1),
                "cores_used": world_size * config.num_threads,
                "teacher_dir": teacher_dir,
            }
        )
        save_metrics(True)
        log(f"done: {step} steps, {train_seconds:.0f} s of training ({stop_reason}); final semantic "
            f"{fmt(final['semantic_accuracy'])} psnr {fmt(final['psnr'], 2)}; saved {teacher_dir}")
    accelerator.wait_for_everyone()  # rank 0 has saved the outputs
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
