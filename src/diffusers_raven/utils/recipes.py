"""What the recipes in ``trainers/`` share around their training loops (their configuration is read by
:func:`~diffusers_raven.utils.recipe_args.parse_recipe_args`): the checkpoint folders and learning-rate clock of the
recipes whose own training loops run on ``accelerate``; and the training-time budget (and the reward against training
time) of the recipes that run a ``transformers.Trainer``."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time

from transformers import TrainerCallback

# ------------------------------------------------------------------------------------------------ accelerate
# The custom training loops of ``trainers/`` (ShapesWorld VAE and teacher) run on an ``accelerate.Accelerator``; the
# helpers below are what they share around it: checkpoint folders written by ``Accelerator.save_state`` and a
# learning-rate schedule from ``transformers.get_scheduler`` whose clock can also follow a time budget.
CHECKPOINT_PREFIX = "checkpoint-"


def portable_checkpoints(accelerator) -> None:
    """Make ``accelerator.save_state``/``load_state`` store the bare modules' weights: without this hook a model
    wrapped in ``DistributedDataParallel`` saves ``module.``-prefixed keys, which a run with another number of
    processes cannot load."""

    def save_hook(models, weights, output_dir) -> None:
        for i, model in enumerate(models):
            if i < len(weights):
                weights[i] = accelerator.unwrap_model(model).state_dict()

    def load_hook(models, input_dir) -> None:
        for i, model in enumerate(models):
            models[i] = accelerator.unwrap_model(model)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _checkpoint_steps(root: str) -> list[tuple[int, str]]:
    """``(step, folder)`` of the complete checkpoint folders in ``root`` (``checkpoint-<step>``, or a
    ``checkpoint-<step>.old`` left by a run killed while replacing one of the same step), oldest first."""
    if not os.path.isdir(root):
        return []
    found: dict[int, str] = {}
    for name in os.listdir(root):
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)(\.old)?", name)
        if match and os.path.isdir(os.path.join(root, name)):
            step = int(match.group(1))
            if match.group(2) is None or step not in found:
                found[step] = os.path.join(root, name)
    return sorted(found.items())


def resolve_checkpoint(resume: str, root: str) -> str:
    """The checkpoint folder that ``--resume`` names: ``"last"`` is the newest complete one in ``root``; anything
    else must be a folder written by :func:`save_checkpoint`. A missing one raises a ``ValueError`` naming
    ``--resume``."""
    if resume == "last":
        found = _checkpoint_steps(root)
        if not found:
            raise ValueError(f"--resume last: no checkpoint folder in {root}")
        return found[-1][1]
    if not os.path.isdir(resume):
        raise ValueError(f"--resume {resume!r} is not a checkpoint folder (written by Accelerator.save_state, such "
                         f"as {os.path.join(root, CHECKPOINT_PREFIX + '<step>')})")
    return resume


def resume_training(accelerator, resume: str, root: str, scheduler, base_lr: float, results: dict,
                    progress) -> str:
    """Load the checkpoint ``--resume`` names into the accelerator's registered state, put the learning-rate
    schedule of this run at the restored step, and record where the run resumed (``results["resumed_from"]``).
    Returns the checkpoint folder."""
    path = resolve_checkpoint(resume, root)
    accelerator.load_state(path)
    set_schedule_position(scheduler, base_lr=base_lr)
    results["resumed_from"] = {"path": path, "step": progress.step}
    return path


def save_checkpoint(accelerator, root: str, step: int, keep: int = 2) -> str:
    """``accelerator.save_state`` into ``root/checkpoint-<step>``, called on every process. The state is written to
    a ``.tmp`` folder first and renamed once complete, so a run killed while saving leaves the previous checkpoint
    whole; the ``keep`` newest checkpoints are kept (so one that another process is reading is not removed under
    it). Returns the folder."""
    final = os.path.join(root, f"{CHECKPOINT_PREFIX}{step}")
    temporary = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(root, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replaced = None
        if os.path.isdir(final):  # a second save at the same step (the end of a run): move the first one aside
            replaced = final + ".old"
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
        os.rename(temporary, final)
        if replaced is not None:
            shutil.rmtree(replaced)
        for _, folder in _checkpoint_steps(root)[:-keep]:
            shutil.rmtree(folder, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def schedule_position(steps: int, elapsed_seconds: float, budget_seconds: float, warmup_steps: int,
                      max_steps: int) -> int:
    """Where a warm-up + decay schedule over ``max_steps`` steps should stand after ``steps`` optimizer steps when
    the run also has a time budget: the step count during the warm-up; after it, the step count or the time
    budget's share of the decay, ``warmup_steps + ⌊elapsed / budget · (max_steps − warmup_steps)⌋``, whichever is
    further. A run that its time budget ends long before ``max_steps`` thus still decays to the end."""
    if steps < warmup_steps:
        return steps
    by_time = warmup_steps + math.floor(min(elapsed_seconds / budget_seconds, 1.0) * (max_steps - warmup_steps))
    return max(steps, by_time)


def set_schedule_position(scheduler, position: int | None = None, base_lr: float | None = None) -> None:
    """Move ``scheduler`` (a ``torch`` ``LambdaLR`` as ``transformers.get_scheduler`` returns, or accelerate's wrapper
    of one) to ``position`` steps (``None``: where it stands) and give its optimizer that step's learning rate.
    ``base_lr`` replaces the peak learning rate, e.g. this run's after ``load_state`` restored a checkpoint's; the
    schedule's shape (warm-up, horizon, floor) is always the one it was made with in this run."""
    inner = getattr(scheduler, "scheduler", scheduler)
    if base_lr is not None:
        inner.base_lrs = [base_lr] * len(inner.base_lrs)
    inner.last_epoch = (inner.last_epoch if position is None else position) - 1
    inner.step()


class TrainingTimeBudget(TrainerCallback):
    """Count training time and stop once ``seconds`` of it are spent (``None``: only count).

    Training time is the sum of the durations of the training steps, from ``on_step_begin`` to ``on_step_end``
    (rollouts, the generator update and its critic updates), so writing checkpoints and logs does not use the
    budget. The running total is saved in every checkpoint (``time_budget.json``) and read back from
    ``resume_from``, so a resumed mode gets what remains of its budget, not a new one.
    """

    FILE = "time_budget.json"

    def __init__(self, seconds: float | None, resume_from: str | None = None) -> None:
        self.seconds, self.elapsed, self.stopped = seconds, 0.0, False
        self.start_step, self.steps_timed, self._step_start = 0, 0, None
        if resume_from is not None and os.path.isfile(os.path.join(resume_from, self.FILE)):
            with open(os.path.join(resume_from, self.FILE)) as f:
                self.elapsed = float(json.load(f)["train_seconds"])
        self.elapsed_at_start = self.elapsed

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step = state.global_step

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_start is not None:
            self.elapsed += time.perf_counter() - self._step_start
            self.steps_timed += 1
            self._step_start = None
        if self.seconds is not None and self.elapsed >= self.seconds:
            control.should_training_stop = self.stopped = True
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            with open(os.path.join(folder, self.FILE), "w") as f:
                json.dump({"train_seconds": self.elapsed, "global_step": state.global_step}, f)


class RewardClock(TrainerCallback):
    """The logged reward against training time (from the budget) and step: the curve the comparison plots. Saved
    in every checkpoint and read back on resume, so a resumed run's curve is whole.

    A point holds the logged ``reward*`` metrics, ``frac_reward_zero_std`` and the ``extra_keys`` that were logged."""

    FILE = "reward_clock.json"

    def __init__(self, budget: TrainingTimeBudget, resume_from: str | None = None,
                 extra_keys: tuple[str, ...] = ()) -> None:
        self.budget, self.points, self.extra_keys = budget, [], tuple(extra_keys)
        if resume_from is not None and os.path.isfile(os.path.join(resume_from, self.FILE)):
            with open(os.path.join(resume_from, self.FILE)) as f:
                self.points = json.load(f)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            point = {"step": state.global_step, "train_seconds": round(self.budget.elapsed, 2)}
            point.update({k: logs[k] for k in logs
                          if k.startswith("reward") or k == "frac_reward_zero_std" or k in self.extra_keys})
            self.points.append(point)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            with open(os.path.join(folder, self.FILE), "w") as f:
                json.dump(self.points, f)
