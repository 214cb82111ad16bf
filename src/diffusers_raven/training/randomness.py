"""Random draws that do not depend on how a batch is split: one generator per sample.

Trainers seed a generator per (sample, purpose), so a sample draws the same numbers whether it sits in a batch of
one or of many, in a micro-batch of a gradient-accumulation step or on another process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GeneratorLike = torch.Generator | list[torch.Generator] | tuple[torch.Generator, ...] | None


def draw_per_sample(
    batch_size: int, generator: GeneratorLike, draw: Callable[[int, torch.Generator | None], torch.Tensor]
) -> torch.Tensor:
    """``draw(n, generator)`` returns ``n`` rows; with a list of generators each sample's row comes from its own."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size}.")
        return torch.cat([draw(1, g) for g in generator])
    return draw(batch_size, generator)
