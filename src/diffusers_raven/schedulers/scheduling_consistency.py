"""Few-step consistency sampler for rectified-flow video models (METHOD §0–§1).

:class:`ConsistencyFlowMatchScheduler` is diffusers' ``FlowMatchLCMScheduler`` step rule (predict ``x̂0``, re-noise
it to the next sigma with fresh noise) with the Self Forcing defaults (shift 5, four steps) and a step output that
also carries the step's Gaussian transition kernel, which the RL trainers need.

This module also holds the schedule logic shared with :mod:`.scheduling_sde` (a private mixin) and the step output
class :class:`SchedulerStepOutput`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FlowMatchLCMScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from .transitions import GaussianTransition, GeneratorLike

__all__ = ["ConsistencyFlowMatchScheduler", "SchedulerStepOutput"]

#: Pre-shift grid of the default four-step schedule (METHOD §1): ``u = [1, .75, .5, .25]``.
DEFAULT_NUM_INFERENCE_STEPS = 4
_SCHEDULE_CACHE_SIZE = 16

SigmaLike = float | torch.Tensor


@dataclass
class SchedulerStepOutput(BaseOutput):
    """Output of ``step()`` of the diffusers-raven schedulers.

    Args:
        prev_sample: the next state ``x_{σ_{k+1}}`` (the chunk's output ``x̂0`` on the last step), in the dtype of
            ``model_output``.
        pred_original_sample: the denoised prediction ``x̂0 = x_σ − σ v̂`` (METHOD §0), in the dtype of
            ``model_output``.
        transition: the step's Gaussian kernel ``π(x_{σ_{k+1}} | x_{σ_k})`` (METHOD §1), kept in float32, with
            gradients through its mean if ``model_output`` has them; ``None`` when the step is deterministic (the
            last step, ``σ_next = 0``, or an SDE step with ``noise_level = 0``).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None
    transition: GaussianTransition | None = None


SchedulerStepOutput.__module__ = "diffusers_raven.schedulers"


# ---------------------------------------------------------------------------------------------------- helpers
def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _float_list(values: Any, name: str) -> list[float]:
    """A 1-D list of Python floats from a list/tuple/array/tensor, or a ValueError naming ``name``."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64)
        if values.ndim != 1:
            raise ValueError(f"`{name}` must be one-dimensional, got shape {tuple(values.shape)}.")
        values = values.tolist()
    elif hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # numpy arrays
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"`{name}` must be a sequence of floats, got {type(values).__name__}.")
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` must contain only numbers: {err}") from None
    if any(not math.isfinite(v) for v in out):
        raise ValueError(f"`{name}` must contain finite numbers, got {out}.")
    return out


def expand_sigma(sigma: SigmaLike, sample: torch.Tensor, frame_dim: int = 2, name: str = "sigma") -> SigmaLike:
    """Make ``sigma`` broadcast against ``sample``.

    Accepts a float, a 0-d tensor, a per-sample ``[B]`` tensor (→ ``[B, 1, …]``), a per-frame ``[B, F]`` tensor
    (→ ``F`` placed at ``frame_dim``, 2 for ``[B, C, F, H, W]`` latents) or a tensor already of ``sample.ndim``
    dimensions. Floats stay floats.
    """
    if isinstance(sigma, bool):
        raise ValueError(f"`{name}` must be a float or a tensor, got a bool.")
    if isinstance(sigma, (int, float)):
        return float(sigma)
    if not isinstance(sigma, torch.Tensor):
        raise ValueError(f"`{name}` must be a float or a tensor, got {type(sigma).__name__}.")
    sigma = sigma.to(sample.device)
    if sigma.ndim == 0:
        return sigma
    ndim, batch = sample.ndim, sample.shape[0] if sample.ndim else 1
    if sigma.ndim == ndim:
        try:
            ok = torch.broadcast_shapes(sigma.shape, sample.shape) == sample.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"`{name}` of shape {tuple(sigma.shape)} does not broadcast to {tuple(sample.shape)}.")
        return sigma
    if sigma.ndim == 1:
        if sigma.shape[0] not in (1, batch):
            raise ValueError(f"`{name}` has {sigma.shape[0]} entries but the batch size is {batch}.")
        return sigma.reshape(-1, *([1] * (ndim - 1)))
    if sigma.ndim == 2 and ndim >= 3:
        fd = frame_dim % ndim
        if fd == 0 or sigma.shape[0] not in (1, batch) or sigma.shape[1] not in (1, sample.shape[fd]):
            raise ValueError(
                f"per-frame `{name}` of shape {tuple(sigma.shape)} does not match sample {tuple(sample.shape)} "
                f"with frames at dim {fd}."
            )
        shape = [1] * ndim
        shape[0], shape[fd] = sigma.shape[0], sigma.shape[1]
        return sigma.reshape(shape)
    raise ValueError(
        f"`{name}` of shape {tuple(sigma.shape)} cannot be matched to a sample of shape {tuple(sample.shape)}."
    )


def _check_step_inputs(model_output: torch.Tensor, sample: torch.Tensor) -> None:
    if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
        raise ValueError("`sample` must be a floating-point tensor.")
    if not isinstance(model_output, torch.Tensor) or model_output.shape != sample.shape:
        shape = tuple(model_output.shape) if isinstance(model_output, torch.Tensor) else type(model_output).__name__
        raise ValueError(f"`model_output` must be a tensor of the sample's shape {tuple(sample.shape)}, got {shape}.")


def _check_sigma_pair(sigma: SigmaLike, sigma_next: SigmaLike) -> bool:
    """Validate a (σ, σ') pair; returns True when the step is final (σ' = 0 everywhere)."""
    if isinstance(sigma, float) and not 0.0 < sigma <= 1.0:
        raise ValueError(f"`sigma` must be in (0, 1], got {sigma}.")
    if isinstance(sigma_next, float):
        if not 0.0 <= sigma_next <= 1.0:
            raise ValueError(f"`sigma_next` must be in [0, 1], got {sigma_next}.")
        if isinstance(sigma, float) and not sigma_next < sigma:
            raise ValueError(f"`sigma_next` ({sigma_next}) must be smaller than `sigma` ({sigma}).")
        return sigma_next == 0.0
    is_zero = sigma_next == 0
    if bool(is_zero.all()):
        return True
    if bool(is_zero.any()):
        raise ValueError("`sigma_next` must be zero for every sample (last step) or for none of them.")
    return False


# ---------------------------------------------------------------------------------------------------- schedule mixin
class _FlowMatchScheduleMixin:
    """Schedule handling shared by the consistency and SDE schedulers (METHOD §0–§1).

    Requires a ``ConfigMixin`` host with ``num_train_timesteps``, ``shift`` and ``denoising_sigmas`` in its config.
    """

    config: Any
    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchLCMScheduler"]

    def _init_schedule_state(self) -> None:
        num_train = self.config.num_train_timesteps
        if not isinstance(num_train, int) or isinstance(num_train, bool) or num_train < 1:
            raise ValueError(f"`num_train_timesteps` must be a positive integer, got {num_train!r}.")
        shift = self.config.shift
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not (shift > 0 and math.isfinite(shift)):
            raise ValueError(f"`shift` must be a positive number, got {shift!r}.")
        if self.config.denoising_sigmas is not None:
            self._validated_sigmas(list(self.config.denoising_sigmas), "denoising_sigmas")
        self._shift = float(shift)
        # Our shift default (5) differs from diffusers' (1): keep it when the config is handed to a diffusers
        # flow-match scheduler via `from_config`, which would otherwise reset keys listed as "default values".
        used_defaults = self.config.get("_use_default_values")
        if used_defaults and "shift" in used_defaults:
            self.register_to_config(_use_default_values=[k for k in used_defaults if k != "shift"])
        # Training grid as in diffusers' flow-match schedulers: shifted t/T for t = T … 1 (no terminal zero).
        grid = torch.arange(num_train, 0, -1, dtype=torch.float64) / num_train
        sigmas = self.shift_sigma(grid).to(torch.float32)
        self.sigmas = sigmas
        self.timesteps = sigmas * num_train
        self.sigma_min = float(sigmas[-1])
        self.sigma_max = float(sigmas[0])
        self._sigma_values: list[float] = sigmas.tolist()
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._schedule_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, list[float]]] = {}
        # Attributes read by inherited diffusers code paths (LCM's scale-wise generation is not supported).
        self._init_size = None
        self._scale_factors = None
        self._upscale_mode = None

    # -------------------------------------------------------------- sigma maps
    def shift_sigma(self, u: float | Sequence[float] | torch.Tensor) -> float | list[float] | torch.Tensor:
        """The shift map of METHOD §0, ``shift_s(u) = s·u / (1 + (s − 1)·u)`` with ``s = self.shift``.

        Accepts a float (→ float), a sequence (→ list of floats) or a tensor (→ tensor of the same dtype).
        """
        s = float(self.shift)
        if isinstance(u, torch.Tensor):
            return s * u / (1.0 + (s - 1.0) * u)
        if isinstance(u, (list, tuple)) or hasattr(u, "tolist"):
            return [s * v / (1.0 + (s - 1.0) * v) for v in _float_list(u, "u")]
        if isinstance(u, bool) or not isinstance(u, (int, float)):
            raise ValueError(f"`u` must be a float, a sequence of floats or a tensor, got {type(u).__name__}.")
        u = float(u)
        return s * u / (1.0 + (s - 1.0) * u)

    def sigma_to_timestep(self, sigma: float | torch.Tensor) -> float | torch.Tensor:
        """``t = num_train_timesteps · σ`` (METHOD §0: ``t = 1000 σ``)."""
        return sigma * self.config.num_train_timesteps

    def timestep_to_sigma(self, timestep: float | torch.Tensor) -> float | torch.Tensor:
        """``σ = t / num_train_timesteps``."""
        return timestep / self.config.num_train_timesteps

    @property
    def schedule_sigmas(self) -> list[float]:
        """The sigmas of the current schedule as Python floats (after ``set_timesteps``: the inference sigmas
        followed by the terminal 0)."""
        return list(self._sigma_values)

    def default_sigmas(self) -> list[float]:
        """The sigmas ``set_timesteps()`` uses without arguments (no terminal 0): ``config.denoising_sigmas`` if
        set, else ``shift(linspace(1, 0, 5)[:-1])`` = ``[1.0, 0.9375, 0.8333…, 0.625]`` for shift 5 (METHOD §1)."""
        if self.config.denoising_sigmas is not None:
            return [float(v) for v in self.config.denoising_sigmas]
        return self._uniform_sigmas(DEFAULT_NUM_INFERENCE_STEPS)

    def _uniform_sigmas(self, num_inference_steps: int) -> list[float]:
        return [self.shift_sigma(1.0 - i / num_inference_steps) for i in range(num_inference_steps)]

    @staticmethod
    def _validated_sigmas(values: list[float], name: str) -> list[float]:
        values = _float_list(values, name)
        if len(values) > 1 and values[-1] == 0.0:  # a terminal zero is accepted and not duplicated
            values = values[:-1]
        if not values:
            raise ValueError(f"`{name}` must contain at least one sigma in (0, 1].")
        if any(not 0.0 < v <= 1.0 for v in values):
            raise ValueError(f"`{name}` must lie in (0, 1] (the terminal 0 is appended automatically), got {values}.")
        if any(b >= a for a, b in zip(values, values[1:])):
            raise ValueError(f"`{name}` must be strictly decreasing, got {values}.")
        return values

    # -------------------------------------------------------------- schedule
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
        timesteps: Sequence[float] | torch.Tensor | None = None,
        unshifted_sigmas: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        """Set the inference schedule; cheap (cached), so a pipeline may call it once per video chunk.

        Exactly one way of choosing the schedule is used, in this order:

        - ``sigmas``: the final sigmas the model is evaluated at (strictly decreasing, in ``(0, 1]``; **not**
          shifted again, unlike diffusers' flow-match schedulers);
        - ``timesteps``: the same, as timesteps ``t = num_train_timesteps · σ``;
        - ``unshifted_sigmas``: the pre-shift grid ``u``; the scheduler applies ``shift_sigma`` (METHOD §0);
        - ``num_inference_steps=n``: ``shift(linspace(1, 0, n + 1)[:-1])``;
        - nothing: :meth:`default_sigmas` (the four Self Forcing sigmas of METHOD §1).

        The terminal sigma 0 is appended (a trailing 0 in the input is accepted and not duplicated). If
        ``num_inference_steps`` is given together with a list, the lengths must agree. Resets the step index.
        """
        given = [
            n
            for n, v in (("sigmas", sigmas), ("timesteps", timesteps), ("unshifted_sigmas", unshifted_sigmas))
            if v is not None
        ]
        if len(given) > 1:
            raise ValueError(f"pass only one of `sigmas`, `timesteps`, `unshifted_sigmas`; got {given}.")
        if num_inference_steps is not None and (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or num_inference_steps < 1
        ):
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")

        num_train = self.config.num_train_timesteps
        given_timesteps: list[float] | None = None
        if sigmas is not None:
            values = self._validated_sigmas(sigmas, "sigmas")
        elif timesteps is not None:
            given_timesteps = _float_list(timesteps, "timesteps")
            if len(given_timesteps) > 1 and given_timesteps[-1] == 0.0:
                given_timesteps = given_timesteps[:-1]
            values = self._validated_sigmas([t / num_train for t in given_timesteps], "timesteps")
        elif unshifted_sigmas is not None:
            u = self._validated_sigmas(unshifted_sigmas, "unshifted_sigmas")
            values = [self.shift_sigma(v) for v in u]
        elif num_inference_steps is not None:
            values = self._uniform_sigmas(num_inference_steps)
        else:
            values = self.default_sigmas()
        if num_inference_steps is not None and len(values) != num_inference_steps:
            raise ValueError(
                f"`num_inference_steps` ({num_inference_steps}) does not match the {len(values)} given sigmas."
            )

        device = torch.device(device) if device is not None else torch.device("cpu")
        key = (tuple(values), None if given_timesteps is None else tuple(given_timesteps), str(device))
        cached = self._schedule_cache.get(key)
        if cached is None:
            sigma_tensor = torch.tensor([*values, 0.0], dtype=torch.float32)
            if given_timesteps is None:
                timestep_tensor = sigma_tensor[:-1] * num_train
            else:
                timestep_tensor = torch.tensor(given_timesteps, dtype=torch.float32)
            cached = (sigma_tensor.to(device), timestep_tensor.to(device), sigma_tensor.tolist())
            if len(self._schedule_cache) >= _SCHEDULE_CACHE_SIZE:
                self._schedule_cache.pop(next(iter(self._schedule_cache)))
            self._schedule_cache[key] = cached
        self.sigmas, self.timesteps, self._sigma_values = cached[0], cached[1], cached[2]
        self.num_inference_steps = len(values)
        self._step_index = None
        self._begin_index = None

    # -------------------------------------------------------------- step bookkeeping
    def index_for_timestep(
        self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None
    ) -> int:
        """Index of ``timestep`` in the schedule (diffusers' rule: the second match if it occurs twice).

        A tensor ``timestep`` with several entries (per-sample or per-frame) must hold one value. A timestep that is
        not bit-equal to a schedule entry matches an entry within ``1e-4 · num_train_timesteps``.
        """
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        if isinstance(timestep, torch.Tensor):
            flat = timestep.detach().reshape(-1).to(schedule_timesteps.device)
            if flat.numel() == 0:
                raise ValueError("`timestep` is empty.")
            if flat.numel() > 1 and not bool((flat == flat[0]).all()):
                raise ValueError("`timestep` holds different values; a scheduler step needs a single timestep.")
            timestep = flat[0]
        else:
            timestep = torch.tensor(float(timestep), dtype=torch.float64, device=schedule_timesteps.device)
        candidates = schedule_timesteps.to(torch.float64)
        target = timestep.to(torch.float64)
        indices = (candidates == target).nonzero()
        if len(indices) == 0:
            indices = ((candidates - target).abs() <= 1e-4 * self.config.num_train_timesteps).nonzero()
        if len(indices) == 0:
            raise ValueError(
                f"`timestep` {float(target):.6g} is not in the current schedule {schedule_timesteps.tolist()}; "
                "pass one of `scheduler.timesteps` (or call `set_begin_index`)."
            )
        pos = 1 if len(indices) > 1 else 0
        return int(indices[pos].item())

    def _sigma_pair_for_step(self, timestep: float | torch.Tensor) -> tuple[float, float]:
        """(σ_k, σ_{k+1}) of the current step, initialising the step index from ``timestep`` if needed."""
        if (
            isinstance(timestep, bool)
            or isinstance(timestep, int)
            or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point())
        ):
            raise ValueError(
                "`timestep` must be one of `scheduler.timesteps` (a float), not an integer index such as the ones from "
                "`enumerate(scheduler.timesteps)`."
            )
        if self._step_index is None:
            self._init_step_index(timestep)
        index = self._step_index
        if index + 1 >= len(self._sigma_values):
            raise ValueError(
                f"`timestep`: step index {index} is past the end of the schedule ({len(self._sigma_values)} sigmas); "
                "call `set_timesteps` before sampling a new chunk."
            )
        return self._sigma_values[index], self._sigma_values[index + 1]

    # -------------------------------------------------------------- forward process
    def add_noise(
        self,
        original_samples: torch.Tensor,
        noise: torch.Tensor,
        sigma: SigmaLike,
        frame_dim: int = 2,
    ) -> torch.Tensor:
        """Rectified-flow forward process ``x_σ = (1 − σ) x0 + σ ε`` (METHOD §0).

        ``sigma`` is a float, a 0-d tensor, a per-sample ``[B]`` tensor or a per-frame ``[B, F]`` tensor (frames at
        ``frame_dim`` of the sample), or a tensor of the sample's rank. Note: the third argument is a *sigma*, not a
        timestep (divide timesteps by ``num_train_timesteps``). Computed in float32, returned in the input dtype.
        """
        if not isinstance(original_samples, torch.Tensor) or not original_samples.is_floating_point():
            raise ValueError("`original_samples` must be a floating-point tensor.")
        if not isinstance(noise, torch.Tensor) or noise.shape != original_samples.shape:
            raise ValueError(f"`noise` must be a tensor of shape {tuple(original_samples.shape)}.")
        if isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and not 0.0 <= float(sigma) <= 1.0:
            raise ValueError(f"`sigma` must be in [0, 1], got {sigma}.")
        s = expand_sigma(sigma, original_samples, frame_dim=frame_dim, name="sigma")
        dtype = _compute_dtype(original_samples, noise)
        if isinstance(s, torch.Tensor):
            s = s.to(dtype)
        x0 = original_samples.to(dtype)
        out = (1.0 - s) * x0 + s * noise.to(device=x0.device, dtype=dtype)
        return out.to(original_samples.dtype)


# ---------------------------------------------------------------------------------------------------- scheduler
class ConsistencyFlowMatchScheduler(_FlowMatchScheduleMixin, FlowMatchLCMScheduler):
    """Few-step consistency sampler (Self Forcing / RAVEN / KVPO; METHOD §1) on diffusers' ``FlowMatchLCMScheduler``.

    Each step predicts ``x̂0 = x_σ − σ v̂`` from the velocity ``v̂ ≈ ε − x0`` and, unless it is the last step,
    re-noises it: ``x_{σ'} = (1 − σ') x̂0 + σ' ε`` with fresh noise ``ε``, i.e. samples the Gaussian kernel
    ``N((1 − σ') x̂0, σ'² I)`` that ``step`` returns as ``transition``. The last step (``σ' = 0``) returns ``x̂0``
    and draws no noise.

    Args:
        num_train_timesteps: ``T`` in ``t = T σ`` (1000).
        shift: ``s`` of the shift map of METHOD §0 (5.0 as in Wan / Self Forcing).
        denoising_sigmas: the final sigmas of the default schedule (used by ``set_timesteps()`` with no argument);
            ``None`` means ``shift(linspace(1, 0, 5)[:-1]) = [1.0, 0.9375, 0.8333…, 0.625]``.

    Differences from the parent: ``set_timesteps(sigmas=...)`` takes the *final* sigmas (no second shift); the
    parent's dynamic shifting, Karras/exponential/beta sigmas and scale-wise generation are not supported. Right
    after construction ``sigmas``/``timesteps`` hold the shifted training grid, as in diffusers.
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchLCMScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 5.0,
        denoising_sigmas: list[float] | None = None,
    ) -> None:
        # The parent's __init__ is not called: it would register its own (unsupported) config entries. The state it
        # sets up is created here instead.
        self._init_schedule_state()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: GeneratorLike = None,
        noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerStepOutput | tuple:
        """One consistency step from ``sample = x_{σ_k}`` (METHOD §1).

        Args:
            model_output: the predicted flow velocity ``v̂ ≈ ε − x0``.
            timestep: the current entry of ``self.timesteps`` (used to locate the step on the first call).
            sample: the current state ``x_{σ_k}``.
            generator: a ``torch.Generator`` (or one per sample) for the fresh noise ``ε_k``.
            noise: the fresh noise ``ε_k`` itself (standard normal, shape of ``sample``); takes precedence over
                ``generator``. Lets a streaming pipeline reproduce a rollout exactly.
            return_dict: return a :class:`SchedulerStepOutput` (default) or the tuple
                ``(prev_sample, pred_original_sample, transition)``.
        """
        sigma, sigma_next = self._sigma_pair_for_step(timestep)
        out = self.step_from_sigmas(model_output, sample, sigma, sigma_next, generator=generator, noise=noise)
        self._step_index += 1
        if not return_dict:
            return (out.prev_sample, out.pred_original_sample, out.transition)
        return out

    def step_from_sigmas(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        sigma: SigmaLike,
        sigma_next: SigmaLike,
        generator: GeneratorLike = None,
        noise: torch.Tensor | None = None,
        frame_dim: int = 2,
    ) -> SchedulerStepOutput:
        """The consistency step for explicit ``(σ, σ')``, without touching the step index (METHOD §1).

        Trainers use it to recompute ``x̂0_θ`` and the kernel mean ``μ_θ = (1 − σ') x̂0_θ`` at recorded states.
        ``sigma``/``sigma_next`` may be floats or per-sample / per-frame tensors (see :func:`expand_sigma`).
        """
        _check_step_inputs(model_output, sample)
        final = _check_sigma_pair(
            sigma if not isinstance(sigma, int) else float(sigma),
            sigma_next if not isinstance(sigma_next, int) else float(sigma_next),
        )
        dtype = _compute_dtype(sample, model_output)
        s = expand_sigma(sigma, sample, frame_dim, "sigma")
        s_next = expand_sigma(sigma_next, sample, frame_dim, "sigma_next")
        if isinstance(s, torch.Tensor):
            s = s.to(dtype)
        if isinstance(s_next, torch.Tensor):
            s_next = s_next.to(dtype)

        x = sample.to(dtype)
        x0 = x - s * model_output.to(dtype)
        if final:
            prev, transition = x0, None
        else:
            transition = GaussianTransition((1.0 - s_next) * x0, s_next)
            prev = transition.sample(generator=generator, noise=noise)
        return SchedulerStepOutput(
            prev_sample=prev.to(model_output.dtype),
            pred_original_sample=x0.to(model_output.dtype),
            transition=transition,
        )


ConsistencyFlowMatchScheduler.__module__ = "diffusers_raven"
