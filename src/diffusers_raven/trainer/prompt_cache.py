"""A bounded cache of the frozen text encoder's states, and prompt streams for the trainers.

At Wan scale a prompt's states are ``max_sequence_length × 4096`` numbers (8 MB in float32 at 512 tokens): kept for
every prompt of a large dataset they would fill the accelerator. :class:`PromptEmbeddingCache` keeps at most
``max_prompts`` of them (least recently used out), on the device the user chooses, and stores each without its
padding: the encoder's states are zero past the prompt's tokens (Wan's ``encode_prompt`` rule), so the cache keeps the
rows up to the last non-zero one and pads again on the way out, bit for bit.

:class:`RepeatedPromptStream` serves a streaming ``datasets.IterableDataset`` in the order TRL's ``RepeatSampler``
serves a map-style dataset, so large prompt sets need not be materialised.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch


class PromptEmbeddingCache:
    """Text-encoder states by prompt, at most ``max_prompts`` of them (least recently used out; ``None``: no limit,
    ``0``: nothing kept), stored on ``device`` without their trailing zero rows."""

    def __init__(self, max_prompts: int | None, device: str | torch.device = "cpu") -> None:
        if max_prompts is not None and (isinstance(max_prompts, bool) or not isinstance(max_prompts, int)
                                        or max_prompts < 0):
            raise ValueError(f"`max_prompts` must be a non-negative integer or None, got {max_prompts!r}.")
        self.max_prompts = max_prompts
        self.device = torch.device(device)
        self._entries: OrderedDict[str, tuple[torch.Tensor, int]] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._entries

    def get(self, prompt: str) -> torch.Tensor | None:
        """The full ``[tokens, dim]`` states of ``prompt`` (on the cache's device), or ``None``; a hit makes the prompt
        the most recently used."""
        entry = self._entries.get(prompt)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(prompt)
        rows, length = entry
        if rows.shape[0] == length:
            return rows
        return torch.cat([rows, rows.new_zeros(length - rows.shape[0], *rows.shape[1:])])

    def put(self, prompt: str, states: torch.Tensor) -> None:
        """Keep ``states`` (``[tokens, dim]``) of ``prompt``, evicting the least recently used prompts beyond the limit."""
        if self.max_prompts == 0:
            return
        if prompt in self._entries:
            self._drop(prompt)
        nonzero = states.flatten(1).ne(0).any(dim=1).nonzero()
        kept = int(nonzero[-1]) + 1 if len(nonzero) else 0
        rows = states[:kept].detach().to(self.device, copy=True)
        self._entries[prompt] = (rows, states.shape[0])
        self.nbytes += rows.numel() * rows.element_size()
        while self.max_prompts is not None and len(self._entries) > self.max_prompts:
            self._drop(next(iter(self._entries)))
            self.evictions += 1

    def _drop(self, prompt: str) -> None:
        rows, _ = self._entries.pop(prompt)
        self.nbytes -= rows.numel() * rows.element_size()

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0


class RepeatedPromptStream(torch.utils.data.IterableDataset):
    """Rows of an iterable dataset in TRL's ``RepeatSampler`` order: ``unique`` rows at a time (a global generation
    batch's prompts), each repeated ``mini_repeat`` times in a row (a prompt's rollouts), the whole block
    ``repeat`` times (its micro-steps and iterations). An incomplete last block is dropped, as the sampler does.

    accelerate shards it like any iterable dataset: every process reads the stream and keeps its slice of each global
    batch, the slice the map-style sampler would give it. ``set_epoch`` is passed on (a shuffled
    ``datasets.IterableDataset`` reshuffles per epoch), so a resumed run reads what the uninterrupted run read."""

    def __init__(self, dataset, unique: int, mini_repeat: int, repeat: int) -> None:
        self.dataset = dataset
        self.unique = unique
        self.mini_repeat = mini_repeat
        self.repeat = repeat

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rows = iter(self.dataset)
        while True:
            block = list(islice(rows, self.unique))
            if len(block) < self.unique:
                return
            for _ in range(self.repeat):
                for row in block:
                    for _ in range(self.mini_repeat):
                        yield row
