"""ShapesWorld model chain, stage 2: train a small Wan VAE (``AutoencoderKLWan``) on ShapesWorld clips.

    python trainers/shapes_vae.py --config trainers/shapes_vae.yaml
    python trainers/shapes_vae.py --config trainers/shapes_vae.yaml --resume last   # continue a run
    python trainers/shapes_vae.py --config trainers/shapes_vae.yaml --learning_rate 3e-4 --output_dir out/vae_lr3e4

The configuration is read as TRL's scripts read theirs (``trl.TrlParser``): the YAML ``--config`` sets fields of
:class:`ShapesVAEConfig`, any field is also a flag (``--dim_mult 1 2 2``, ``--patch_size null``), and a misspelt
key fails naming the closest field.

Every step renders fresh clips from new scene seeds (rendering is cheap next to the VAE), takes a random spatial
crop of each (the VAE is convolutional, so crops cut the cost per step and it still encodes whole 64x64 frames), and
minimises a reconstruction loss (L1 or MSE in [-1, 1] pixel units, on the decoder output before the [-1, 1] clamp of
``vae.decode`` so saturated pixels keep their gradient) plus ``beta_kl`` times the KL divergence of the
posterior to N(0, I). With ``sample_posterior: false`` the decoder sees the posterior mean in training, as it does
in evaluation and downstream (in a 10-minute CPU try, decoding samples kept the held-out PSNR below 10 dB).
The loop runs on ``accelerate`` (an ``Accelerator`` on the CPU, one process). The learning rate follows
``transformers``' ``cosine_with_min_lr`` schedule: linear warm-up from 0 over ``warmup_steps``, then a cosine to
``min_lr_ratio`` times the peak at ``max_steps``; after the warm-up the schedule's step count is moved ahead to the
time budget's share of the cosine when that is further (``diffusers_raven.utils.recipes.schedule_position``), so a run
cut short by its time budget still anneals.

Evaluation: reconstruction PSNR of whole held-out clips (seeds from ``eval_seed``, a range disjoint from the training
seeds), full resolution, encoded to the posterior mode and decoded with ``vae.decode``; measured at step 0, every
``eval_every_steps`` and at the end. Stopping early (Ctrl-C or SIGTERM) ends the loop and still saves everything.

Checkpoints: every ``checkpoint_every_steps`` (and at the end) ``Accelerator.save_state`` writes the VAE, optimizer,
learning-rate schedule, RNG states and the run's progress (step, elapsed training time, crop generator, curves) to
``<output_dir>/vae_checkpoints/checkpoint-<step>`` (written under a temporary name and renamed once complete; the two
newest are kept). ``--resume last`` (or a checkpoint folder) continues from it with ``Accelerator.load_state``: a run
killed after a checkpoint and resumed takes the same steps as one that was never stopped.

Before saving, ``latents_mean``/``latents_std`` in the VAE config are set to the per-channel mean/std of the latents
(posterior mode) of ``stats_num_clips`` training clips, so ``normalize_latents`` gives ~unit-variance latents.

Decoder fine-tuning (``init_from`` a trained VAE folder, ``train_encoder: false``): the encoder and ``quant_conv``
are frozen, so the latent space, and with it every later stage trained on it (teacher, student), stays valid; only the
decoder learns, from the frozen posterior mode, and ``latents_mean``/``latents_std`` are kept from ``init_from``. With
``decoder_base_dim`` different from the loaded decoder's width, a new decoder of that width starts from random weights
(Wan 2.2's ``decoder_base_dim``); otherwise the loaded decoder continues training. The model fields (``z_dim``,
``base_dim``, ``dim_mult``, ``is_residual``, ``patch_size``) are then read from ``init_from``, not from the YAML.

Outputs in ``output_dir``: ``vae/`` (``save_pretrained``), ``vae_metrics.json`` (every printed figure, the config and
the command) and ``vae_reconstruction.png`` (held-out clips: rows alternate original / reconstruction).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKLWan
from PIL import Image
from transformers import get_scheduler

from diffusers_raven.pipelines.vae_streaming import StreamingVAEDecoder, normalize_latents
from diffusers_raven.shapes import render_video, sample_scene
from diffusers_raven.utils.recipe_args import parse_recipe_args
from diffusers_raven.utils.recipes import (
    resume_training,
    save_checkpoint,
    schedule_position,
    set_schedule_position,
)

CHECKPOINT_DIR = "vae_checkpoints"


@dataclass
class ShapesVAEConfig:
    """Configuration of the ShapesWorld VAE recipe (every field can be set in the YAML file).

    Parameters that control the model: ``z_dim``, ``base_dim``, ``dim_mult`` (4 entries: 8x spatial compression; the
    temporal compression is Wan's 4x), ``model_seed``, ``init_logvar``.
    Parameters that control the data: ``num_frames`` (1 + 4k), ``batch_size``, ``crop_size``, ``train_seed``.
    Parameters that control the training: ``loss``, ``sample_posterior``, ``beta_kl``, ``learning_rate``,
    ``min_lr_ratio``, ``warmup_steps``, ``weight_decay``, ``max_grad_norm``, ``max_steps``, ``time_budget_minutes``,
    ``checkpoint_every_steps``.
    Parameters that control the evaluation and outputs: ``eval_*``, ``stats_num_clips``, ``output_dir``.
    """

    # model
    z_dim: int = field(default=16, metadata={"help": "latent channels"})
    base_dim: int = field(default=16, metadata={"help": "channels of the first encoder stage"})
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2], metadata={"help": "channel multipliers"})
    model_seed: int = field(default=0, metadata={"help": "seed of the random initialisation"})
    is_residual: bool = field(
        default=False, metadata={"help": "Wan 2.2 residual blocks: parameter-free average-pool / duplicate shortcuts"}
    )
    patch_size: int | None = field(
        default=None, metadata={"help": "pixel patchify before the encoder (Wan 2.2 style); spatial factor x patch"}
    )
    init_logvar: float | None = field(
        default=None, metadata={"help": "initial bias of the posterior log-variance (None: keep the random init)"}
    )
    decoder_base_dim: int | None = field(
        default=None, metadata={"help": "channels of the decoder's stages (None: base_dim, or the init_from decoder's)"}
    )
    init_from: str | None = field(
        default=None, metadata={"help": "a trained AutoencoderKLWan folder to start from (its config wins)"}
    )
    train_encoder: bool = field(
        default=True, metadata={"help": "False: freeze encoder + quant_conv (decoder fine-tuning; needs init_from)"}
    )
    # data
    num_frames: int = field(default=9, metadata={"help": "frames per training clip (1 + 4k)"})
    batch_size: int = field(default=4, metadata={"help": "clips per step"})
    crop_size: int = field(default=32, metadata={"help": "random square crop of each training clip (64 = none)"})
    train_seed: int = field(default=0, metadata={"help": "scene seeds of step s are train_seed + s*batch_size + i"})
    # training
    loss: str = field(default="l1", metadata={"help": "reconstruction loss: 'l1' or 'mse'"})
    sample_posterior: bool = field(
        default=False, metadata={"help": "decode a posterior sample (True) or the posterior mean (False) in training"}
    )
    beta_kl: float = field(default=1e-6, metadata={"help": "weight of the KL term (summed over latent elements)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak AdamW learning rate"})
    min_lr_ratio: float = field(default=0.05, metadata={"help": "final learning rate / peak"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    max_steps: int = field(default=10_000, metadata={"help": "stop after this many steps"})
    time_budget_minutes: float = field(default=30.0, metadata={"help": "stop the training loop after this time"})
    checkpoint_every_steps: int = field(default=200, metadata={"help": "checkpoint interval (0 disables)"})
    # evaluation and outputs
    eval_every_steps: int = field(default=100, metadata={"help": "evaluate every this many steps"})
    eval_seed: int = field(default=1_000_000_000, metadata={"help": "first held-out scene seed"})
    eval_num_clips: int = field(default=6, metadata={"help": "held-out clips per evaluation"})
    eval_num_frames: int = field(default=21, metadata={"help": "frames per held-out clip (1 + 4k)"})
    stats_num_clips: int = field(default=16, metadata={"help": "training clips for latents_mean/latents_std"})
    figure_frames: list[int] = field(default_factory=lambda: [0, 5, 10, 20], metadata={"help": "frames in the PNG"})
    output_dir: str = field(default="out/shapes", metadata={"help": "where vae/ and the metrics go"})
    num_threads: int = field(default=1, metadata={"help": "torch CPU threads (1 avoids oversubscribing a shared CPU)"})

    def __post_init__(self) -> None:
        for name in ("num_frames", "eval_num_frames"):
            if (getattr(self, name) - 1) % 4:
                raise ValueError(f"{name}={getattr(self, name)} must be 1 + 4k (Wan's 4x temporal compression)")
        if self.loss not in ("l1", "mse"):
            raise ValueError(f"loss must be 'l1' or 'mse', got {self.loss!r}")
        if len(self.dim_mult) < 2:
            raise ValueError(f"dim_mult={self.dim_mult} needs at least 2 entries (one temporal+spatial down-sampling)")
        if self.patch_size is not None and self.patch_size < 1:
            raise ValueError(f"patch_size={self.patch_size} must be None or an int >= 1")
        if not self.train_encoder and self.init_from is None:
            raise ValueError("train_encoder=False needs init_from (a trained VAE whose encoder is kept)")
        if self.init_from is not None and not os.path.isfile(os.path.join(self.init_from, "config.json")):
            raise ValueError(f"init_from={self.init_from!r} is not a saved AutoencoderKLWan folder (no config.json)")
        if self.decoder_base_dim is not None and self.decoder_base_dim < 1:
            raise ValueError(f"decoder_base_dim={self.decoder_base_dim} must be None or a positive int")
        if self.crop_size % 8 or not 8 <= self.crop_size <= 64:
            raise ValueError(f"crop_size={self.crop_size} must be a multiple of 8 in [8, 64]")
        for name in ("batch_size", "max_steps", "eval_every_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.warmup_steps < 0 or self.checkpoint_every_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} and checkpoint_every_steps="
                             f"{self.checkpoint_every_steps} must be >= 0")
        if self.time_budget_minutes <= 0:
            raise ValueError(f"time_budget_minutes={self.time_budget_minutes} must be positive")


@dataclass
class ShapesVAEScriptArguments:
    """What the command line adds to the config."""

    resume: str | None = field(default=None, metadata={"help": "a checkpoint folder (<output_dir>/vae_checkpoints/"
                                                               "checkpoint-<step>), or 'last' for <output_dir>'s newest"})


def load_config(path: str, *flags: str) -> ShapesVAEConfig:
    """The config of the YAML file ``path`` with ``flags`` (``"--learning_rate", "3e-4"``) on top."""
    return parse_recipe_args((ShapesVAEConfig, ShapesVAEScriptArguments), ["--config", path, *flags])[0]


def build_vae(config: ShapesVAEConfig) -> AutoencoderKLWan:
    """The randomly initialised VAE of ``config``: ``len(dim_mult) - 1`` down-samplings, the last two also temporal
    (4x in time); spatial factor ``2 ** (len(dim_mult) - 1)`` times ``patch_size``."""
    downsamplings = len(config.dim_mult) - 1
    temporal = [False] * max(downsamplings - 2, 0) + [True] * min(downsamplings, 2)
    patch = config.patch_size or 1
    channels = 3 * patch * patch
    torch.manual_seed(config.model_seed)
    vae = AutoencoderKLWan(
        base_dim=config.base_dim,
        decoder_base_dim=config.decoder_base_dim,
        z_dim=config.z_dim,
        dim_mult=list(config.dim_mult),
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=temporal,
        is_residual=config.is_residual,
        patch_size=config.patch_size,
        in_channels=channels,
        out_channels=channels,
        latents_mean=[0.0] * config.z_dim,
        latents_std=[1.0] * config.z_dim,
        scale_factor_temporal=2 ** sum(temporal),
        scale_factor_spatial=2**downsamplings * patch,
    )
    return vae


def load_initial_vae(config: ShapesVAEConfig) -> AutoencoderKLWan:
    """The ``init_from`` VAE; with a different ``decoder_base_dim``, its encoder and ``quant_conv`` under a new
    decoder of that width (``model_seed`` initialises it)."""
    vae = AutoencoderKLWan.from_pretrained(config.init_from)
    width = vae.config.decoder_base_dim or vae.config.base_dim
    if config.decoder_base_dim is None or config.decoder_base_dim == width:
        return vae
    torch.manual_seed(config.model_seed)
    widened = AutoencoderKLWan.from_config({**vae.config, "decoder_base_dim": config.decoder_base_dim})
    kept = {k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    missing, unexpected = widened.load_state_dict(kept, strict=False)
    if unexpected or any(k.startswith(("encoder.", "quant_conv.")) for k in missing):
        raise ValueError(f"the encoder of {config.init_from} does not fit: missing {missing}, unexpected {unexpected}")
    return widened


# ------------------------------------------------------------------------------------------------ data
def render_clips(seeds: list[int], num_frames: int) -> torch.Tensor:
    """Render one scene per seed: float ``[B, 3, F, 64, 64]`` in [-1, 1]."""
    videos = np.stack([render_video(sample_scene(seed), num_frames) for seed in seeds])  # [B, F, H, W, 3]
    return torch.from_numpy(videos).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def random_crop(clips: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """An independent random ``size x size`` crop of each clip (all frames of a clip share the crop)."""
    height, width = clips.shape[-2:]
    if size >= min(height, width):
        return clips
    crops = []
    for clip in clips:
        top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
        crops.append(clip[..., top : top + size, left : left + size])
    return torch.stack(crops)


# ------------------------------------------------------------------------------------------------ loss
def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent elements, averaged over the batch."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(dim=1).mean()


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    diff = reconstruction - target
    return diff.abs().mean() if kind == "l1" else diff.pow(2).mean()


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def reconstruct(vae: AutoencoderKLWan, clips: torch.Tensor) -> torch.Tensor:
    """Encode to the posterior mode and decode with ``vae.decode``, one clip at a time: ``[B, 3, F, H, W]``."""
    return torch.cat([vae.decode(vae.encode(clip[None]).latent_dist.mode()).sample for clip in clips])


def to_uint8(clips: torch.Tensor) -> torch.Tensor:
    return ((clips.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def psnr_per_clip(reference: torch.Tensor, reconstruction: torch.Tensor) -> list[float]:
    """PSNR in dB of each whole clip, on the uint8 videos (peak 255)."""
    diff = to_uint8(reference).float() - to_uint8(reconstruction).float()
    mse = diff.pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)
    return (10.0 * torch.log10(255.0**2 / mse)).tolist()


def evaluate(vae: AutoencoderKLWan, clips: torch.Tensor) -> tuple[dict, torch.Tensor]:
    was_training = vae.training
    vae.eval()
    reconstruction = reconstruct(vae, clips)
    vae.train(was_training)
    psnr = psnr_per_clip(clips, reconstruction)
    return {"psnr": float(np.mean(psnr)), "psnr_min": float(np.min(psnr)), "psnr_per_clip": psnr}, reconstruction


@torch.no_grad()
def latent_statistics(vae: AutoencoderKLWan, clips: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior-mode latents of ``clips`` (over clips, frames and positions)."""
    vae.eval()
    latents = torch.cat([vae.encode(clip[None]).latent_dist.mode() for clip in clips])  # [B, C, T, h, w]
    per_channel = latents.transpose(0, 1).flatten(1)
    return per_channel.mean(dim=1).tolist(), per_channel.std(dim=1).tolist()


def save_reconstruction_figure(path: str, clips: torch.Tensor, reconstruction: torch.Tensor, frames: list[int]):
    """A PNG grid: for each clip a row of original frames above a row of the same frames reconstructed."""
    frames = [t for t in frames if t < clips.shape[2]]
    rows = []
    for original, decoded in zip(to_uint8(clips), to_uint8(reconstruction)):
        for video in (original, decoded):
            rows.append(torch.cat([video[:, t] for t in frames], dim=2))  # [3, H, len(frames) * W]
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()
    Image.fromarray(grid).save(path)


# ------------------------------------------------------------------------------------------------ main
class StopFlag:
    """Set by SIGTERM so the loop ends after the current step and the run still saves its results."""

    def __init__(self) -> None:
        self.stop = False

    def __call__(self, signum, frame) -> None:
        self.stop = True


class TrainingProgress:
    """What a checkpoint holds besides the VAE, optimizer, learning-rate schedule and RNG states that
    ``Accelerator.save_state`` writes: the step, the training seconds so far, the crop generator, the curves and the
    losses summed since the last logged step (registered with ``accelerator.register_for_checkpointing``)."""

    RESUMED_RESULTS = ("eval_curve", "train_curve")

    def __init__(self, crop_generator: torch.Generator, results: dict) -> None:
        self.step, self.elapsed_seconds = 0, 0.0
        self.crop_generator, self.results = crop_generator, results
        self.running = {"loss": 0.0, "reconstruction": 0.0, "kl": 0.0, "n": 0}

    def state_dict(self) -> dict:
        return {"step": self.step, "elapsed_seconds": self.elapsed_seconds,
                "crop_generator": self.crop_generator.get_state(), "results": self.results,
                "running": dict(self.running)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.elapsed_seconds = state["step"], state["elapsed_seconds"]
        self.running = dict(state["running"])
        self.crop_generator.set_state(state["crop_generator"])
        for key in self.RESUMED_RESULTS:  # the curves continue; config and command are this run's
            self.results[key] = state["results"][key]


def main(argv: list[str] | None = None) -> dict:
    config, cli = parse_recipe_args((ShapesVAEConfig, ShapesVAEScriptArguments), argv, description=__doc__)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:
        raise ValueError(f"shapes_vae.py trains in one process; it was launched as {processes} (WORLD_SIZE): run it "
                         "with python, not torchrun")
    accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False)  # the recipe trains on the CPU
    command = " ".join(["python", "trainers/shapes_vae.py", *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(config.num_threads)
    os.makedirs(config.output_dir, exist_ok=True)
    metrics_path = os.path.join(config.output_dir, "vae_metrics.json")
    checkpoint_root = os.path.join(config.output_dir, CHECKPOINT_DIR)

    vae = load_initial_vae(config) if config.init_from else build_vae(config)
    if not config.train_encoder:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    if config.init_logvar is not None and config.init_from is None:
        # ``quant_conv`` outputs [mean, logvar]: a negative bias starts training from a small posterior std
        with torch.no_grad():
            vae.quant_conv.bias[config.z_dim :] = config.init_logvar
    vae.train()
    num_parameters = sum(p.numel() for p in vae.parameters())
    trained = [p for p in vae.parameters() if p.requires_grad]
    num_trained = sum(p.numel() for p in trained)
    optimizer = torch.optim.AdamW(trained, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=config.warmup_steps,
                              num_training_steps=config.max_steps,
                              scheduler_specific_kwargs={"min_lr_rate": config.min_lr_ratio})
    vae, optimizer, scheduler = accelerator.prepare(vae, optimizer, scheduler)
    crop_generator = torch.Generator().manual_seed(config.train_seed)
    eval_clips = render_clips([config.eval_seed + i for i in range(config.eval_num_clips)], config.eval_num_frames)
    print(f"vae: {num_parameters:,} parameters ({num_trained:,} trained); eval on {config.eval_num_clips} held-out "
          f"clips x {config.eval_num_frames} frames at {eval_clips.shape[-2]}x{eval_clips.shape[-1]}")

    results: dict = {
        "config": asdict(config),
        "command": command,
        "num_parameters": num_parameters,
        "num_trained_parameters": num_trained,
        "eval_curve": [],
        "train_curve": [],
    }
    progress = TrainingProgress(crop_generator, results)
    accelerator.register_for_checkpointing(progress)
    if cli.resume is not None:
        path = resume_training(accelerator, cli.resume, checkpoint_root, scheduler, config.learning_rate, results,
                               progress)
        print(f"resumed from {path} at step {progress.step} ({progress.elapsed_seconds:.0f} s of training so far)")
    elapsed_before = progress.elapsed_seconds

    def record_eval(step: int, elapsed: float) -> torch.Tensor:
        scores, reconstruction = evaluate(vae, eval_clips)
        if results["eval_curve"] and results["eval_curve"][-1]["step"] == step:  # e.g. a resumed run that had ended
            results["eval_curve"].pop()
        results["eval_curve"].append({"step": step, "elapsed_seconds": round(elapsed, 1), **scores})
        print(f"eval step {step}: psnr {scores['psnr']:.2f} dB (min {scores['psnr_min']:.2f}) at {elapsed:.0f} s")
        with open(metrics_path, "w") as f:  # a partial file survives a killed run
            json.dump({**results, "finished": False}, f, indent=2)
        return reconstruction

    def checkpoint(elapsed: float) -> None:
        progress.elapsed_seconds = elapsed
        save_checkpoint(accelerator, checkpoint_root, progress.step)

    stop = StopFlag()
    previous_handler = signal.signal(signal.SIGTERM, stop)
    budget_seconds = 60.0 * config.time_budget_minutes
    start = time.perf_counter()
    if not results["eval_curve"]:
        record_eval(0, 0.0)
    stop_reason = "max_steps"
    running = progress.running
    try:
        while progress.step < config.max_steps:
            step = progress.step
            elapsed = elapsed_before + time.perf_counter() - start
            if elapsed >= budget_seconds:
                stop_reason = "time_budget"
                break
            if stop.stop:
                stop_reason = "signal"
                break
            lr = scheduler.get_last_lr()[0]

            seeds = [config.train_seed + step * config.batch_size + i for i in range(config.batch_size)]
            clips = random_crop(render_clips(seeds, config.num_frames), config.crop_size, crop_generator)
            with torch.set_grad_enabled(config.train_encoder):
                posterior = vae.encode(clips).latent_dist
            # unclamped decode: ``vae.decode`` clamps to [-1, 1], which zeroes the gradient of saturated pixels
            latents = posterior.sample() if config.sample_posterior else posterior.mode()
            reconstruction = StreamingVAEDecoder(vae, clamp=False).decode(latents)
            rec_loss = reconstruction_loss(reconstruction, clips, config.loss)
            kl = kl_to_standard_normal(posterior.mean, posterior.logvar)
            loss = rec_loss + config.beta_kl * kl
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(trained, config.max_grad_norm)
            optimizer.step()
            progress.step = step = step + 1
            set_schedule_position(scheduler, schedule_position(step, elapsed, budget_seconds, config.warmup_steps,
                                                           config.max_steps))

            for key, value in (("loss", loss), ("reconstruction", rec_loss), ("kl", kl)):
                running[key] += value.detach().item()
            running["n"] += 1
            if step % 10 == 0 or step == config.max_steps:
                n = running["n"]
                entry = {"step": step, "lr": lr, **{k: v / n for k, v in running.items() if k != "n"}}
                results["train_curve"].append(entry)
                print(f"step {step}: loss {entry['loss']:.4f} rec {entry['reconstruction']:.4f} "
                      f"kl {entry['kl']:.1f} lr {lr:.2e} ({elapsed_before + time.perf_counter() - start:.0f} s)",
                      flush=True)
                running.update(loss=0.0, reconstruction=0.0, kl=0.0, n=0)
            if step % config.eval_every_steps == 0 and step < config.max_steps:
                record_eval(step, elapsed_before + time.perf_counter() - start)
            if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
                checkpoint(elapsed_before + time.perf_counter() - start)
    except KeyboardInterrupt:
        stop_reason = "interrupted"
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    train_seconds = elapsed_before + time.perf_counter() - start
    step = progress.step

    final_reconstruction = record_eval(step, train_seconds)
    if config.checkpoint_every_steps:
        checkpoint(train_seconds)
    if config.train_encoder:
        stats_clips = render_clips([config.train_seed + i for i in range(config.stats_num_clips)],
                                   config.eval_num_frames)
        latents_mean, latents_std = latent_statistics(vae, stats_clips)
        vae.register_to_config(latents_mean=latents_mean, latents_std=latents_std)
    else:  # same encoder, same latent space: keep the statistics the later stages normalise with
        latents_mean, latents_std = list(vae.config.latents_mean), list(vae.config.latents_std)
    with torch.no_grad():  # check: held-out latents after normalisation should be ~zero-mean, unit-variance
        held_out = torch.cat([vae.encode(clip[None]).latent_dist.mode() for clip in eval_clips])
        normalized = normalize_latents(held_out, vae)
    vae_dir = os.path.join(config.output_dir, "vae")
    vae.save_pretrained(vae_dir)
    save_reconstruction_figure(
        os.path.join(config.output_dir, "vae_reconstruction.png"), eval_clips, final_reconstruction,
        config.figure_frames,
    )

    final = results["eval_curve"][-1]
    results.update(
        {
            "finished": True,
            "stop_reason": stop_reason,
            "steps": step,
            "train_clips_seen": step * config.batch_size,
            "train_wall_seconds": round(train_seconds, 1),
            "total_wall_seconds": round(time.perf_counter() - start, 1),
            "seconds_per_step": round(train_seconds / max(step, 1), 3),
            "final_psnr": final["psnr"],
            "final_psnr_min": final["psnr_min"],
            "initial_psnr": results["eval_curve"][0]["psnr"],
            "latent_shape_per_eval_clip": list(held_out.shape[1:]),
            "latents_mean": latents_mean,
            "latents_std": latents_std,
            "held_out_normalized_latent_mean": float(normalized.mean()),
            "held_out_normalized_latent_std": float(normalized.std()),
            "vae_dir": vae_dir,
        }
    )
    with open(metrics_path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"done: {step} steps in {train_seconds:.0f} s ({stop_reason}); final psnr {final['psnr']:.2f} dB; "
          f"normalised held-out latents mean {results['held_out_normalized_latent_mean']:.3f} "
          f"std {results['held_out_normalized_latent_std']:.3f}; saved {vae_dir}")
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
