"""FSDP2 support of the trainer base: engaging accelerate's FSDP plugin where accelerate leaves it unused, and moving
full (unsharded) states in and out of sharded modules, optimizers and EMA shadows.

Sharding itself is accelerate's (``fsdp2_prepare_model``: ``torch.distributed.fsdp.fully_shard`` on every block the
plugin names, e.g. ``WanTransformerBlock``, then on the root), and so are the optimizer checkpoints; this module only
fills the gaps:

- **CPU runs.** accelerate 1.x enters FSDP only on accelerator devices: on CPU (gloo) its state stays ``MULTI_CPU``
  with the plugin unused, and ``transformers.Trainer`` then wraps the model in DDP without a word.
  :func:`engage_fsdp` switches the state to FSDP with the same plugin (FSDP2 runs on CPU with gloo), so a CPU run goes
  through the code paths of a GPU run. Any other configuration that asks for FSDP and does not get it is an error.
- **Full states.** Parameters of a sharded module are ``DTensor`` shards; :func:`gather_state_dict`,
  :func:`load_state_dict`, :func:`gather_optimizer_state` and :func:`load_optimizer_state` convert between those and
  the full tensors checkpoints and exports hold. Every gather is a collective: all processes call it, in the same
  order.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

#: What ``torch.distributed.algorithms._checkpoint.checkpoint_wrapper`` inserts in parameter names.
CHECKPOINT_WRAPPER_PREFIX = "_checkpoint_wrapped_module."


def fsdp_requested(args) -> bool:
    """Whether the run asks for FSDP: ``fsdp``/``fsdp_config`` in the training arguments, or an accelerate FSDP launch
    (``accelerate launch --use_fsdp`` or a config file with ``distributed_type: FSDP`` set ``ACCELERATE_USE_FSDP``)."""
    return getattr(args, "fsdp_plugin_args", None) is not None or (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    )


def engage_fsdp(accelerator, args) -> bool:
    """Make sure a run that asks for FSDP runs FSDP; returns whether FSDP is on.

    - accelerate already set it up (GPU launches): nothing to do;
    - several CPU processes (gloo; ``torchrun`` with ``ACCELERATE_USE_CPU=1`` or ``use_cpu=True``): accelerate left the
      plugin unused, so its state is switched to FSDP with the plugin of the arguments (or of the ``FSDP_*``
      environment of an accelerate launch). Only FSDP2 (``fsdp_version: 2``) runs on CPU;
    - anything else (one process, FSDP1 on CPU, another distributed type): a ``ValueError`` saying what was set up
      instead, never a silent fallback to DDP or to a single process.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return True
    if not fsdp_requested(args):
        return False
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise ValueError(
            f"FSDP was asked for (`fsdp`/`fsdp_config` or an accelerate FSDP launch) but accelerate set up "
            f"{state.distributed_type.value} with {state.num_processes} process(es): FSDP needs several processes "
            "(`accelerate launch --config_file trainers/accelerate_configs/fsdp.yaml`, or `torchrun --nproc_per_node N` "
            "with `ACCELERATE_USE_CPU=1` on CPU). Remove `fsdp` to train without it."
        )
    plugin = FullyShardedDataParallelPlugin(**(getattr(args, "fsdp_plugin_args", None) or {}))
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"FSDP on CPU runs only as FSDP2: set `fsdp_config={{'fsdp_version': 2, ...}}` (got version "
            f"{plugin.fsdp_version})."
        )
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    if accelerator.is_main_process:
        logger.warning(
            f"FSDP2 on CPU: accelerate leaves its FSDP plugin unused on CPU, so the trainer switched its state from "
            f"MULTI_CPU to FSDP ({state.num_processes} processes, gloo). Blocks wrapped: "
            f"{plugin.transformer_cls_names_to_wrap or 'by the auto-wrap policy'}."
        )
    return True


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ``DTensor`` (an FSDP2 shard)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def keep_block_inputs(module: torch.nn.Module) -> int:
    """Turn off FSDP2's cast of the forward inputs on the FSDP units inside ``module`` (keeping the root's); returns
    how many units changed.

    With mixed precision (``param_dtype`` set) FSDP2 casts every unit's floating-point inputs by rebuilding them
    (``torch.distributed.utils._apply_to_tensors``): a dataclass argument is replaced by a copy. The causal transformer
    hands each block its pass's attention context, a dataclass into which the blocks put the new keys and values for
    the model to write to the KV cache afterwards: a block given a copy writes into the copy, and every cached pass
    (rollouts, streaming, re-caches) then runs with an empty cache, silently. The root still casts the model's inputs;
    the blocks' other inputs come out of the root's computation, in the compute dtype already."""
    import dataclasses

    from torch.distributed.fsdp import FSDPModule

    changed = 0
    for unit in module.modules():
        if unit is module or not isinstance(unit, FSDPModule):
            continue
        state = unit._get_fsdp_state()
        policy = state._mp_policy
        if policy.param_dtype is not None and policy.cast_forward_inputs:
            state._mp_policy = dataclasses.replace(policy, cast_forward_inputs=False)
            changed += 1
    return changed


def reshard(module: torch.nn.Module) -> None:
    """Reshard every FSDP2 unit of ``module`` (no communication): its parameters are the ``DTensor`` shards again.
    FSDP2 keeps the root's parameters gathered after a forward pass, as plain tensors, until the next reshard."""
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor of a ``DTensor`` (a collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def clean_name(name: str) -> str:
    """A parameter name without activation-checkpoint wrapper components (the model's own name)."""
    return name.replace(CHECKPOINT_WRAPPER_PREFIX, "")


def gather_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of ``module`` on every process, as fresh CPU tensors (one full tensor gathered at a time).
    A collective when ``module`` is sharded."""
    from torch.distributed.tensor import DTensor

    state = {}
    for name, value in module.state_dict().items():
        full = full_tensor(value).detach()
        state[clean_name(name)] = full.cpu() if isinstance(value, DTensor) else full.to("cpu", copy=True)
    return state


def load_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load the full ``state`` into ``module``; a sharded module keeps its sharding (each process keeps its shard of
    the full tensors, which every process holds)."""
    if not is_sharded(module):
        module.load_state_dict(state, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def gather_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full state of ``optimizer`` (over ``module``'s parameters), keyed by parameter names
    (``torch.distributed.checkpoint``'s format). A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a state written by :func:`gather_optimizer_state` (every process passes the full state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def shard_like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``tensor`` (full, the same on every process) laid out as ``param``: its local shard when ``param`` is a
    ``DTensor`` (no communication), else ``tensor`` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and not isinstance(tensor, DTensor):
        return distribute_tensor(tensor.to(param.device, param.dtype), param.device_mesh, param.placements,
                                 src_data_rank=None)
    return tensor


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``parameters`` to a total 2-norm of ``max_norm`` and return the norm before clipping,
    whether the gradients are ``DTensor`` shards or plain tensors (one partial norm per device mesh, each reduced
    over its mesh, as ``transformers.Trainer`` does for mixed meshes).

    ``Accelerator.clip_grad_norm_`` under FSDP first looks for the prepared model that owns the parameters by
    comparing parameter lists element by element, which fails as soon as two prepared models have the same number of
    parameters (the student and RAVEN's critic)."""
    from collections import defaultdict

    from torch.distributed.tensor import DTensor
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    groups = defaultdict(list)
    for param in parameters:
        if param.grad is not None:
            groups[param.grad.device_mesh if isinstance(param.grad, DTensor) else None].append(param)
    norms = [full_tensor(get_total_norm([p.grad for p in params])) for params in groups.values()]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    for params in groups.values():
        clip_grads_with_norm_(params, max_norm, total)
    return total
